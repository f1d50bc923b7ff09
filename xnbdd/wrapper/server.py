"""xnbd-wrapper's composition root: the exports, their servers, the NBD listeners, the control
socket, signals and systemd. The parts are in registry, supervisor, frontend and control."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field, replace

import trio

from .. import logs
from ..listeners import PatientListener, describe
from ..signals import sigterm_came_early
from ..systemd import Notifier
from .control import CommandError, ControlServer, Write
from .frontend import Frontend
from .registry import ExportEntry, Registry, RegistryError, apply_switches
from .supervisor import StartError, Supervisor

log = logging.getLogger("xnbdd")


@dataclass
class WrapperOptions:
    bgctl_command: list[str]
    cow: bool = False
    readonly: bool = False
    handoff: bool = True
    handshake_timeout: float = 30.0
    control_path: str | None = None  # the socket file to remove at exit (None: systemd's)


@dataclass
class WrapperSockets:
    nbd: list[socket.socket] = field(default_factory=list)
    control: list[socket.socket] = field(default_factory=list)


class Wrapper:
    def __init__(self, opts: WrapperOptions, registry: Registry, supervisor: Supervisor) -> None:
        self.opts = opts
        self.registry = registry
        self.supervisor = supervisor
        supervisor.on_change = self._update_status
        self.frontend = Frontend(
            registry, supervisor, handoff=opts.handoff, handshake_timeout=opts.handshake_timeout
        )
        self.control = ControlServer(self)
        self.notifier = Notifier(unset_environment=True)  # children must not speak for us
        self._stop_scope = trio.CancelScope()
        self._orphan = False
        self._signalled = False  # stopped by SIGTERM/SIGINT rather than the shutdown command

    # -- life cycle -----------------------------------------------------------------------------

    async def run(self, sockets: WrapperSockets) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.supervisor.nursery = nursery
                nursery.start_soon(self._signals)
                with self._stop_scope:
                    async with trio.open_nursery() as serving:
                        for socks, handler in (
                            (sockets.nbd, self.frontend.serve),
                            (sockets.control, self.control.serve),
                        ):
                            if socks:  # serve_listeners fails on an empty list
                                listeners = [PatientListener(sock) for sock in socks]
                                serving.start_soon(trio.serve_listeners, handler, listeners)
                        where = ", ".join(describe(s) for s in sockets.nbd)
                        control = ", ".join(describe(s) for s in sockets.control)
                        log.info("listening on %s, control on %s", where, control)
                        self.notifier.ready()
                        self._update_status()
                self.notifier.stopping()
                self._save_quietly()
                if self._orphan:
                    log.info(
                        "orphan: leaving %d export server(s) running",
                        len(self.supervisor.running()),
                    )
                elif (
                    self._signalled
                    and self.supervisor.settings.systemd_units
                    and self.notifier.enabled
                ):
                    # systemd stops or restarts the export units with this one (PartOf=); a stop
                    # from here would turn a restart into a stop and end their clients, which
                    # a restart hands over instead (docs/handover.md).
                    log.info("leaving the export units to systemd")
                else:
                    with trio.CancelScope(shield=True):
                        await self.supervisor.stop_all()
                nursery.cancel_scope.cancel()
        finally:
            for sock in [*sockets.nbd, *sockets.control]:
                sock.close()
            if self.opts.control_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.opts.control_path)
            self.notifier.close()
        log.info("stopped")

    def shutdown(self, orphan: bool) -> None:
        log.info("%s requested", "orphan" if orphan else "shutdown")
        self._orphan = orphan
        self.frontend.stopping = True
        self._stop_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            if sigterm_came_early():
                self._signalled = True
                self.shutdown(orphan=False)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logs.reopen()
                    log.info("SIGHUP: log file reopened")
                else:
                    self._signalled = True
                    self.shutdown(orphan=False)

    def _update_status(self) -> None:
        running = len(self.supervisor.running())
        self.notifier.status(f"{len(self.registry)} exports, {running} running")

    def _save_quietly(self) -> None:
        try:
            self.registry.save()
        except RegistryError as err:
            log.error("%s", err)

    # -- control commands (xnbdd.wrapper.control.Commands) --------------------------------------

    async def list_exports(self, write: Write) -> int:
        lines = [f"{index} : {entry.describe()}" for index, entry in self.registry]
        await write("\n".join(lines or ["no item"]) + "\n")
        return 0

    def _add(self, entry: ExportEntry) -> None:
        entry = apply_switches(entry, cow=self.opts.cow, readonly=self.opts.readonly)
        try:
            self.registry.add(entry)
        except RegistryError as err:
            raise CommandError(str(err)) from None
        log.info("export %r added", entry.name)
        self._update_status()

    async def add_target(self, name: str, path: str, write: Write) -> int:
        self._add(ExportEntry(name=name, mode="target", image=path))
        return 0

    async def add_proxy(self, args: list[str], write: Write) -> int:
        name, host, port, cache, bitmap, ctl = args[:6]
        self._add(
            ExportEntry(
                name=name,
                mode="proxy",
                image=cache,
                bitmap=bitmap,
                control_socket=ctl,
                remote_host=host,
                remote_port=port,
                remote_export_name=args[6] if len(args) > 6 else None,
            )
        )
        return 0

    async def remove(self, how: str, key: str, write: Write) -> int:
        if how == "del-exportname":
            names = [key] if self.registry.get(key) else []
        elif how == "del-file":
            names = self.registry.find_by_file(key)
        else:
            try:
                found = self.registry.find_by_index(int(key))
            except ValueError:
                raise CommandError(f"not an index: {key!r}") from None
            names = [found] if found else []
        if not names:
            raise CommandError(f"no export matches {key!r}")
        for name in names:
            try:
                self.registry.remove(name)
            except RegistryError as err:
                raise CommandError(str(err)) from None
            log.info("export %r removed", name)
            await self.supervisor.stop(name)
        self._update_status()
        return 0

    async def save(self, write: Write) -> int:
        try:
            self.registry.save()
        except RegistryError as err:
            raise CommandError(str(err)) from None
        path = self.registry.db.path if self.registry.db else "(none)"
        await write(f'Database written to file "{path}".\n')
        return 0

    async def bgctl(self, command: str, args: list[str], write: Write) -> int:
        name = args[0]
        entry = self.registry.get(name)
        if entry is None:
            raise CommandError(f"no export named {name!r}")
        if entry.mode != "proxy":
            raise CommandError(f"export {name!r} is not a proxy export")
        try:
            proc = await self.supervisor.ensure(entry)  # control works with or without clients
        except StartError as err:
            raise CommandError(str(err)) from None
        what = command.removeprefix("bgctl-")
        argv = [*self.opts.bgctl_command, f"--{what}", entry.control_socket]
        if what == "reconnect":
            argv += args[1:3]
            if len(args) > 3:
                argv.insert(len(self.opts.bgctl_command), f"--exportname={args[3]}")
        result = await trio.run_process(
            argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False
        )
        await write(result.stdout.decode("utf-8", "replace"))
        code = result.returncode if result.returncode >= 0 else 128 - result.returncode
        if code == 0 and what in ("switch", "reconnect"):
            if what == "switch":
                changed = replace(
                    entry,
                    mode="target",
                    remote_host="",
                    remote_port="",
                    remote_export_name=None,
                    bitmap="",
                    control_socket="",
                )
            else:
                changed = replace(
                    entry,
                    remote_host=args[1],
                    remote_port=args[2],
                    remote_export_name=args[3] if len(args) > 3 else None,
                )
            try:
                self.registry.replace(changed)
            except RegistryError as err:
                raise CommandError(str(err)) from None
            # The same process keeps serving, now in its new shape: no restart, no disconnect.
            self.supervisor.rebind(name, proc, changed)
        return code
