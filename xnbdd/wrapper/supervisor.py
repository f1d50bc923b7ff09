"""One xnbd-server process per export, shared by every client of that export.

A process is started on first use (a client chose the export, or asked about a proxy export),
receives each negotiated client over its hand-off socket (xnbdd/handoff.py), and is stopped when
the export is removed or the wrapper shuts down. A process that dies takes only its own export's
connections with it; the next client starts a new one.

Per-export files live in the wrapper's runtime directory, named by a hash of the export's
settings, never by its name, so no export name can reach outside that directory. A server still
listening there from an earlier wrapper (``orphan``, or a restart with KillMode=process) is
adopted instead of started twice, as long as its settings are the same.

With ``systemd_units`` the server of an export is the systemd unit ``xnbd-export@NAME.service``
instead of a child (xnbdd/wrapper/units.py): started, stopped and watched through systemd, and
handed clients the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..backends.file import FileBackend
from ..export import Export
from ..handoff import HandoffError, export_from_json, query_export, send_handoff
from ..proto.messages import ExportInfo, Negotiated
from .registry import ExportEntry
from .units import (
    EXPORTS_DIR,
    UnitError,
    config_path,
    export_config,
    remove_config,
    start_unit,
    stop_unit,
    unit_name,
    write_config,
)

log = logging.getLogger("xnbdd")

START_TIMEOUT = 30.0
STOP_GRACE = 10.0
POLL = 0.05
DYING_WAIT = 2.0  # a failed hand-off waits this long for the server's exit before it gives up


class StartError(Exception):
    """The export's server could not be started (the message carries its exit status)."""


@dataclass
class ServerSettings:
    """What every spawned xnbd-server gets, from the wrapper's command line."""

    command: list[str]
    run_dir: str
    syslog: bool = False
    logpath: str | None = None
    max_queue_size: str | None = None  # passed unchanged, proxy mode only (as the original)
    max_buf_size: str | None = None
    verbose: bool = False
    systemd_units: bool = False  # xnbd-export@NAME.service units instead of children
    units_dir: str = EXPORTS_DIR  # their configuration files and hand-off sockets


def server_args(
    entry: ExportEntry,
    settings: ServerSettings,
    handoff: str | None,
    connected_fd: int | None = None,
) -> list[str]:
    """xnbd-server's command line for ``entry`` (the original's order and options)."""
    mode = {"target": "--target", "cow_target": "--cow-target", "proxy": "--proxy"}
    args = [*settings.command, mode[entry.server_mode]]
    if entry.readonly:
        args.append("--readonly")
    if handoff is not None:
        args += [f"--handoff-socket={handoff}", f"--exportname={entry.name}"]
        if entry.description:
            args.append(f"--description={entry.description}")
    if connected_fd is not None:
        args.append(f"--connected-fd={connected_fd}")
    if settings.syslog:
        args.append("--syslog")
    if settings.logpath:
        args.append(f"--logpath={settings.logpath}")
    if settings.verbose:
        args.append("--verbose")
    if entry.mode == "proxy":
        if settings.max_queue_size is not None:
            args.append(f"--max-queue-size={settings.max_queue_size}")
        if settings.max_buf_size is not None:
            args.append(f"--max-buf-size={settings.max_buf_size}")
        if entry.remote_export_name:
            args.append(f"--target-exportname={entry.remote_export_name}")
        args += [
            "--",
            entry.remote_host,
            entry.remote_port,
            entry.image,
            entry.bitmap,
            entry.control_socket,
        ]
    else:
        args += ["--", entry.image]
    return args


def handoff_path(entry: ExportEntry, settings: ServerSettings) -> str:
    identity = json.dumps(server_args(entry, settings, "-"), separators=(",", ":"))
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    directory = settings.units_dir if settings.systemd_units else settings.run_dir
    return os.path.join(directory, f"export-{digest}.sock")


def image_info(entry: ExportEntry) -> ExportInfo:
    """Blocking: what a target-mode server will advertise, from the image itself (the same
    code the server runs), without starting it."""
    backend = FileBackend.open(entry.image, readonly=entry.readonly)
    try:
        info = Export(
            entry.name, backend, description=entry.description, readonly=entry.readonly
        ).info()
    finally:
        os.close(backend.fd)  # nothing was written: no flush needed
    return info


@dataclass
class ExportProcess:
    entry: ExportEntry
    path: str
    pid: int
    info: ExportInfo
    process: trio.Process | None  # None: a unit, or adopted from an earlier wrapper
    unit: str | None = None  # xnbd-export@NAME.service when run by systemd
    exited: trio.Event = field(default_factory=trio.Event)
    clients: int = 0


class Supervisor:
    def __init__(
        self, settings: ServerSettings, on_change: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_change = on_change or (lambda: None)
        self.nursery: trio.Nursery | None = None  # set by the wrapper before serving
        self._running: dict[str, ExportProcess] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._info: dict[str, ExportInfo] = {}  # last known, also for exports not running
        # Exports whose unit this wrapper started: systemd may restart one behind our back
        # (Restart=on-failure), so removal and shutdown stop these units whether running or not.
        self._units: set[str] = set()

    def running(self) -> dict[str, ExportProcess]:
        return dict(self._running)

    def forget(self, name: str) -> None:
        self._info.pop(name, None)

    # -- what the handshake needs ---------------------------------------------------------------

    def cached_info(self, name: str) -> ExportInfo | None:
        return self._info.get(name)

    async def learn_info(self, entry: ExportEntry) -> ExportInfo:
        """Size and flags for the handshake: from the running server; for a target that is not
        running, from its image; otherwise the server is started (first use)."""
        proc = self._running.get(entry.name)
        if proc is not None and proc.entry == entry:
            return proc.info
        if entry.server_mode == "target":
            try:
                info = await trio.to_thread.run_sync(image_info, entry)
            except (OSError, ValueError) as err:
                raise StartError(f"export {entry.name!r}: {err}") from None
        else:
            info = (await self.ensure(entry)).info
        self._info[entry.name] = info
        return info

    # -- processes ------------------------------------------------------------------------------

    async def ensure(self, entry: ExportEntry) -> ExportProcess:
        """The export's running server, started (or adopted) if there is none."""
        lock = self._locks.setdefault(entry.name, trio.Lock())
        async with lock:
            proc = self._running.get(entry.name)
            if proc is not None and proc.entry != entry:
                await self._stop(proc)  # the export was changed (switch, reconnect, re-add)
                proc = None
            if proc is None:
                proc = await self._start(entry)
                self._running[entry.name] = proc
                self._info[entry.name] = proc.info
                self.on_change()
            return proc

    async def _start(self, entry: ExportEntry) -> ExportProcess:
        path = handoff_path(entry, self.settings)
        unit = None
        if self.settings.systemd_units:
            unit = unit_name_for(entry)
            self._write_unit_config(entry, unit, path)
        with contextlib.suppress(HandoffError):
            answer = await trio.to_thread.run_sync(query_export, path, 1.0)
            log.info("export %r: adopting running server (pid %s)", entry.name, answer["pid"])
            proc = ExportProcess(
                entry, path, int(answer["pid"]), export_from_json(answer["export"]), None, unit
            )
            self._spawn_watch(proc)
            return proc
        if unit is not None:
            return await self._start_unit(entry, path, unit)
        args = server_args(entry, self.settings, path)
        log.info("export %r: starting %s", entry.name, " ".join(args))
        process = await trio.lowlevel.open_process(args, stdin=subprocess.DEVNULL)
        try:
            answer = await self._wait_ready(path, process)
        except BaseException:
            with contextlib.suppress(OSError):
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            raise
        proc = ExportProcess(entry, path, process.pid, export_from_json(answer["export"]), process)
        self._spawn_watch(proc)
        log.info("export %r: server ready (pid %d)", entry.name, process.pid)
        return proc

    def _write_unit_config(self, entry: ExportEntry, unit: str, path: str) -> None:
        text = export_config(
            entry,
            path,
            max_queue_size=self.settings.max_queue_size,
            max_buf_size=self.settings.max_buf_size,
        )
        try:
            write_config(config_path(unit, self.settings.units_dir), text)
        except (UnitError, OSError) as err:
            raise StartError(f"{unit}: cannot write its configuration: {err}") from None

    async def _start_unit(self, entry: ExportEntry, path: str, unit: str) -> ExportProcess:
        log.info("export %r: starting %s", entry.name, unit)
        try:
            await start_unit(unit)
        except UnitError as err:
            raise StartError(str(err)) from None
        self._units.add(entry.name)
        # systemctl returns once the server said READY=1, after binding its hand-off socket.
        answer = None
        with trio.move_on_after(START_TIMEOUT):
            while answer is None:
                try:
                    answer = await trio.to_thread.run_sync(query_export, path, 1.0)
                except HandoffError:
                    await trio.sleep(POLL)
        if answer is None:
            raise StartError(f"{unit} is active but its hand-off socket {path} does not answer")
        proc = ExportProcess(
            entry, path, int(answer["pid"]), export_from_json(answer["export"]), None, unit
        )
        self._spawn_watch(proc)
        log.info("export %r: %s ready (pid %d)", entry.name, unit, proc.pid)
        return proc

    async def _wait_ready(self, path: str, process: trio.Process) -> dict[str, Any]:
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if process.poll() is not None:
                    raise StartError(
                        f"server exited with status {process.returncode} "
                        "while starting (see its log)"
                    )
                try:
                    return await trio.to_thread.run_sync(query_export, path, 1.0)
                except HandoffError:
                    await trio.sleep(POLL)
        raise StartError(f"server not ready after {START_TIMEOUT:.0f} s")

    def _spawn_watch(self, proc: ExportProcess) -> None:
        assert self.nursery is not None, "Supervisor.nursery must be set before use"
        self.nursery.start_soon(self._watch, proc)

    async def _watch(self, proc: ExportProcess) -> None:
        if proc.process is not None:
            status = await proc.process.wait()
        else:
            await _wait_exit(proc.pid)
            status = None
        proc.exited.set()
        if self._running.get(proc.entry.name) is proc:
            del self._running[proc.entry.name]
            self.on_change()
        how = (
            f"exit status {status}"
            if status is None or status >= 0
            else (f"signal {signal.Signals(-status).name}")
        )
        if proc.unit is not None:
            how = f"see systemctl status {proc.unit}"
        log.log(
            logging.INFO if status in (0, None) else logging.WARNING,
            "export %r: server (pid %d) ended, %s",
            proc.entry.name,
            proc.pid,
            how,
        )

    def rebind(self, name: str, proc: ExportProcess, entry: ExportEntry) -> None:
        """The export changed shape inside its running server (proxy switched to target, or
        reconnected): keep that server for the new entry instead of restarting it."""
        if self._running.get(name) is proc:
            proc.entry = entry
            if proc.unit is not None:
                # A restart by systemd (Restart=on-failure) must come back in the new shape.
                with contextlib.suppress(StartError):
                    self._write_unit_config(entry, proc.unit, proc.path)

    async def stop(self, name: str) -> None:
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            proc = self._running.pop(name, None)
            if proc is not None:
                self.on_change()
                await self._stop(proc)
            elif name in self._units:
                await self._stop_unit(name, unit_name(name))
            self._units.discard(name)
        self._info.pop(name, None)

    async def _stop(self, proc: ExportProcess) -> None:
        """SIGTERM (the server finishes requests in flight), SIGKILL after the grace period.
        A unit is stopped by systemd, which does the same (KillMode=mixed, TimeoutStopSec=)."""
        self._running.pop(proc.entry.name, None)
        if proc.unit is not None:
            await self._stop_unit(proc.entry.name, proc.unit)
            with trio.move_on_after(STOP_GRACE):
                await proc.exited.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            await proc.exited.wait()
            return
        log.warning(
            "export %r: server (pid %d) ignored SIGTERM, killing it", proc.entry.name, proc.pid
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.exited.wait()

    async def _stop_unit(self, name: str, unit: str) -> None:
        log.info("export %r: stopping %s", name, unit)
        try:
            await stop_unit(unit)
        except UnitError as err:
            log.error("export %r: %s", name, err)
        remove_config(config_path(unit, self.settings.units_dir))

    async def stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for name in set(self._running) | self._units:
                nursery.start_soon(self.stop, name)

    # -- clients --------------------------------------------------------------------------------

    async def hand_over(
        self, entry: ExportEntry, client: socket.socket, negotiated: Negotiated, pending: bytes
    ) -> ExportProcess:
        """Pass a negotiated client to the export's server; one retry with a fresh server when
        the running one has died meanwhile. The caller closes its copy of ``client`` after."""
        for attempt in (1, 2):
            proc = await self.ensure(entry)
            try:
                await trio.to_thread.run_sync(send_handoff, proc.path, client, negotiated, pending)
            except HandoffError as err:
                if attempt == 1:
                    # A server killed a moment ago still exists (exiting, or a zombie its
                    # parent has not reaped: kill(pid, 0) succeeds) while its socket no longer
                    # answers; its exit comes within moments, then a fresh one gets the client.
                    with trio.move_on_after(DYING_WAIT):
                        await proc.exited.wait()
                    if proc.exited.is_set():
                        continue
                raise StartError(f"export {entry.name!r}: hand-off failed: {err}") from None
            return proc
        raise AssertionError("unreachable")

    async def connected_fd(self, entry: ExportEntry, client: socket.socket) -> None:
        """The fallback without hand-off, as the original: one server per connection, given the
        negotiated socket as ``--connected-fd`` (simple replies only)."""
        fd = client.fileno()
        args = server_args(entry, self.settings, None, connected_fd=fd)
        log.info("export %r: starting %s", entry.name, " ".join(args))
        process = await trio.lowlevel.open_process(args, stdin=subprocess.DEVNULL, pass_fds=(fd,))
        assert self.nursery is not None
        self.nursery.start_soon(process.wait)


def unit_name_for(entry: ExportEntry) -> str:
    try:
        return unit_name(entry.name)
    except UnitError as err:
        raise StartError(str(err)) from None


async def _wait_exit(pid: int) -> None:
    """Wait for a process that is not our child (a server adopted after the wrapper restarted):
    its pidfd becomes readable when it exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
