"""What an operator asks of a running xnbd-server, by a signal (daemon.py) or on the control
socket (control/handlers.py, through ControlTarget): the status (query, and the STATUS= line), a
snapshot, the proxy's cache-all, reconnect and switch to target mode, and a reload of the
configuration file. The daemon wires it: it hands over the export once it is open and is told
of every change through ``changed``."""

from __future__ import annotations

import errno as errno_mod
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import trio

from . import logs
from .backends.cow import CowBackend
from .backends.file import FileBackend
from .backends.proxy import ProxyBackend
from .budget import Limits
from .config import Config, ConfigError, Mode, load
from .connection import ServerState
from .control.handlers import ProgressSink, Restarting
from .dial import RemoteAddress
from .export import Export
from .proto.handshake import TLSPolicy
from .snapshot import LiveSnapshot
from .systemd import Notifier

if TYPE_CHECKING:
    from .daemon import ServerOptions

log = logging.getLogger("xnbdd")

STATUS_INTERVAL = 2.0  # proxy mode: how often STATUS= follows the cached percentage
SWITCH_BLOCKS_PER_REQUEST = 256  # SIGUSR2 on an incomplete cache fetches the rest like this


class Operations:
    """The server's operations (a ControlTarget). ``opts`` is shared with the daemon: a reload
    changes its live settings (description, max_clients) in place."""

    def __init__(
        self,
        opts: ServerOptions,
        state: ServerState,
        notifier: Notifier,
        changed: Callable[[], None],
    ) -> None:
        self.opts = opts
        self.state = state
        self.notifier = notifier
        self.changed = changed  # the status changed: the daemon tells systemd
        self.export: Export | None = None  # set once the backend is open
        self.proxy: ProxyBackend | None = None  # set in proxy mode until the switch
        self.mode = opts.mode  # becomes TARGET after a proxy switches
        self.operation = ""  # a switch in progress, shown in STATUS
        self.snapshot_job: LiveSnapshot | None = None  # a snapshot being taken
        self._cache_alls: set[trio.CancelScope] = set()  # cut by a handover (docs/handover.md)

    def cut_cache_alls(self) -> None:
        """A handover: each cache-all's client is told to come back (control socket)."""
        for scope in self._cache_alls:
            scope.cancel()

    def status_text(self) -> str:
        clients = self.state.clients
        noun = "client" if clients == 1 else "clients"
        text = f"{self.mode} {self.opts.image}: {clients} {noun}"
        if self.state.tls.policy is not TLSPolicy.OFF:
            text += f" ({self.state.tls_clients} over TLS, TLS {self.state.tls.policy.value})"
        if self.proxy is not None:
            status = self.proxy.status()
            percent = 100.0 * status.cached_blocks / max(status.total_blocks, 1)
            text += f", {percent:.1f}% cached from {status.remote} ({status.remote_state})"
        if operation := self.current_operation():
            text += f", {operation}"
        return text

    def current_operation(self) -> str:
        job = self.snapshot_job
        return job.describe() if job is not None else self.operation

    async def status_loop(self) -> None:
        while self.proxy is not None:
            await trio.sleep(STATUS_INTERVAL)
            self.changed()

    async def snapshot(self) -> str:
        """Copy the image as clients see it to ``<image>.snapshot.<epoch>``; returns the path
        once the copy is durable. Requests pause only while the point is fixed; without a
        reflink the copy is made in the background behind a write guard (snapshot.py)."""
        export = self.export
        if export is None or not isinstance(export.backend, (FileBackend, CowBackend)):
            raise OSError(errno_mod.ENOTSUP, f"snapshot is not available in {self.mode} mode")
        if self.snapshot_job is not None:
            job = self.snapshot_job
            raise OSError(
                errno_mod.EBUSY,
                f"refused: a snapshot is in progress ({job.describe()}); ask again once it is done",
            )
        if self.operation:
            raise OSError(errno_mod.EBUSY, f"refused: {self.operation}")
        job = self.snapshot_job = LiveSnapshot(self.opts.image, export.backend)
        self.changed()
        # Worker processes write past the pause and the guard: their clients come back here
        # for the whole snapshot (workers.py).
        recall = self.state.workers.recalled() if self.state.workers else nullcontext()
        try:
            async with recall:
                # Paused: writes answered before this point are in the copy, later ones are not.
                paused = trio.current_time()
                async with export.paused():
                    await job.begin()
                paused = trio.current_time() - paused
                if job.method == "copy":
                    log.info(
                        "snapshot point taken (requests paused %.1f ms): copying %d bytes to %s "
                        "in the background",
                        paused * 1e3,
                        job.size,
                        job.partial,
                    )
                self.changed()
                result = await job.finish(self._snapshot_progress(job), self.opts.snapshot_rate)
        except BaseException:
            if job.method:  # a cancelled copy (the server stops): nothing of it stays
                with trio.CancelScope(shield=True):
                    await job.abandon()
            raise
        finally:
            self.snapshot_job = None
            self.changed()
        log.info(
            "snapshot %s: %d bytes by %s in %.3f s",
            result.path,
            result.size,
            result.method,
            result.seconds,
        )
        return result.path

    def _snapshot_progress(self, job: LiveSnapshot) -> Callable[[int, int], None]:
        """STATUS= follows a background copy every STATUS_INTERVAL; the log, each quarter."""
        logged = [0]
        shown = [trio.current_time()]

        def progress(copied: int, total: int) -> None:
            now = trio.current_time()
            if now - shown[0] >= STATUS_INTERVAL:
                shown[0] = now
                self.changed()
            quarter = 4 * copied // max(total, 1)
            if 0 < quarter < 4 and quarter > logged[0]:
                logged[0] = quarter
                log.info("snapshot %s: %d%% copied", job.path, 25 * quarter)

        return progress

    async def snapshot_logged(self) -> None:
        try:
            await self.snapshot()
        except OSError as err:
            log.error(
                "snapshot failed: %s", err.strerror or err, extra={"XNBD_ERRNO": str(err.errno)}
            )

    # -- the proxy ------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        limits, workers = self.state.limits, self.state.workers
        requests, held = workers.usage() if workers is not None else (0, 0)
        result: dict[str, Any] = {
            "mode": self.mode,
            "pid": os.getpid(),
            "image": self.opts.image,
            "size": self.export.size if self.export is not None else 0,
            "clients": self.state.clients,
            "tls": self.state.tls.policy.value,
            "tls_clients": self.state.tls_clients,
            "connections": [c.describe() for c in self.state.connections],
            "workers": workers.pids() if workers is not None else [],
            "operation": self.current_operation(),
            # the whole server: the daemon's and its workers' (as they last reported)
            "queue_used": self.state.budget.requests + requests,
            "queue_limit": limits.max_requests,
            "buffer_used": self.state.budget.used + held,
            "buffer_limit": limits.max_bytes * self.state.byte_shares,
        }
        if self.snapshot_job is not None:
            result["snapshot"] = self.snapshot_job.as_dict()
        if self.proxy is not None:
            result.update(self.proxy.status().as_dict())
        return result

    def _require_proxy(self, what: str) -> ProxyBackend:
        if self.proxy is None:
            raise RuntimeError(f"{what} needs proxy mode (this server is in {self.mode} mode)")
        return self.proxy

    async def cache_all(self, blocks_per_request: int, progress: ProgressSink) -> None:
        proxy = self._require_proxy("cache-all")
        restarting = "the server is restarting; cache-all goes on in the next process"
        if self.state.handover:  # asked again of this process while it hands over
            raise Restarting(restarting)
        log.info("cache-all started, %d blocks per request", blocks_per_request)
        with trio.CancelScope() as scope:
            self._cache_alls.add(scope)
            try:
                await proxy.cache_all(blocks_per_request, progress)
            finally:
                self._cache_alls.discard(scope)
        if scope.cancelled_caught:
            raise Restarting(restarting)
        status = proxy.status()
        log.info(
            "cache-all complete: every block is cached (%d fetched from the origin so far, %d "
            "cached as zeros the origin named, without fetching)",
            status.fetched_blocks,
            status.zeroed_blocks,
        )
        self.changed()

    async def reconnect(self, host: str, port: str, exportname: str | None) -> None:
        proxy = self._require_proxy("reconnect")
        # The new origin is reached as the old one was: with TLS when --remote-tls is set.
        await proxy.reconnect(RemoteAddress(host, port, exportname, tls=self.opts.remote_tls))
        log.info("reconnected to %s", proxy.status().remote)
        self.changed()

    async def switch(self, force: bool) -> str:
        """Proxy -> target in place: drain, detach the origin, serve the cache image. Clients
        keep their connections; returns once target mode serves (docs/decisions.md D26)."""
        proxy = self._require_proxy("switch")
        if self.operation:
            raise RuntimeError(f"refused: {self.operation}")
        missing = proxy.nblocks - proxy.cached_blocks()
        if missing and not force:
            raise RuntimeError(
                f"{missing} blocks are not cached yet; run cache-all first, or force the switch "
                "(uncached blocks would then read as zeros)"
            )
        assert self.export is not None
        self.operation = "switching to target mode"
        self.changed()
        try:
            await self.export.replace_backend(proxy.switch_to_target)
        finally:
            self.operation = ""
        await proxy.release_origin()
        self.proxy = None
        self.mode = Mode.TARGET
        logs.set_context(XNBD_MODE=self.mode)
        if missing:
            message = (
                f"switched to target mode by force: {missing} uncached blocks "
                f"read as zeros from now on"
            )
            log.warning("%s", message)
        else:
            message = f"switched to target mode: serving {self.opts.image} without the origin"
            log.info("%s", message)
        self.changed()
        return message

    async def switch_when_complete(self) -> None:
        """SIGUSR2: switch now if the cache is complete, else cache the rest first. A signal
        never makes a client read a block the origin did not give (unlike the original)."""
        proxy = self.proxy
        if proxy is None:
            log.info("SIGUSR2: nothing to switch in %s mode", self.mode)
            return
        try:
            missing = proxy.nblocks - proxy.cached_blocks()
            if missing:
                log.info("SIGUSR2: %d blocks not cached yet; caching them, then switching", missing)
                self.operation = "caching the rest before switching"
                self.changed()
                try:
                    await proxy.cache_all(SWITCH_BLOCKS_PER_REQUEST, lambda _c, _t: None)
                finally:
                    self.operation = ""
            await self.switch(force=False)
        except (OSError, RuntimeError, ValueError) as err:
            log.error("SIGUSR2: switch failed: %s", err)

    async def cached_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        proxy = self.proxy
        if proxy is None:
            return [(length, 1)]  # after the switch everything is local
        return [(run, 1 if cached else 0) for run, cached in proxy.cached_extents(offset, length)]

    def reload(self) -> None:
        """SIGHUP: reopen the log file and apply what can change while serving from the
        configuration file; other changed keys wait for a restart, which the log says."""
        self.notifier.reloading()
        logs.reopen()
        if self.state.workers is not None:
            self.state.workers.reopen_logs()
        if self.opts.config:
            try:
                config = load(self.opts.config)
            except ConfigError as err:
                log.error("reload failed, settings unchanged: %s", err)
            else:
                self._apply_config(config)
        log.info("reloaded")
        self.notifier.ready()

    def _apply_config(self, config: Config) -> None:
        limits = self.state.limits
        tls_keys = self._tls_keys()
        for key, value in config.values().items():  # what the file sets, not the defaults
            if key in self.opts.command_line_keys:
                continue  # the command line wins, as at start
            if key == "description" and self.export is not None:
                self.export.description = self.opts.description = str(value)
            elif key == "max_queue_size" and isinstance(value, int):
                limits.max_requests = value or Limits.max_requests
            elif key == "max_buf_size" and isinstance(value, int):
                # with worker processes, this process's share (workers.py)
                limits.max_bytes = (value or Limits.max_bytes) // self.state.byte_shares
            elif key == "handshake_timeout" and isinstance(value, float):
                limits.handshake_timeout = value
            elif key in tls_keys:
                if tls_keys[key] != value:
                    self._restart_needed(key)
            elif key == "snapshot_rate" and isinstance(value, int):
                self.opts.snapshot_rate = value  # from the next snapshot on
            elif key == "max_clients" and isinstance(value, int):
                self.opts.max_clients = value  # connected clients stay; new ones see it
            elif getattr(self.opts, key, value) != value:
                self._restart_needed(key)
        if self.state.workers is not None:
            self.state.workers.apply_limits(limits)

    def _tls_keys(self) -> dict[str, object]:
        """The TLS settings in the configuration's terms (they change only at a restart)."""
        tls, remote = self.opts.tls, self.opts.remote_tls
        return {
            "tls": tls.mode.value,
            "tls_certificates": tls.certificates or None,
            "tls_verify_peer": tls.verify_peer,
            "tls_psk": tls.psk_file or None,
            "remote_tls": remote is not None,
            "remote_tls_ca": (remote.ca or None) if remote else None,
            "remote_tls_cert": (remote.cert or None) if remote else None,
            "remote_tls_key": (remote.key or None) if remote else None,
        }

    def _restart_needed(self, key: str) -> None:
        log.warning(
            "reload: %s changed in %s; it takes effect at the next restart",
            key.replace("_", "-"),
            self.opts.config,
        )
