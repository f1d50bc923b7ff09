"""The composition root: opens the backend, wraps it in an export, serves the client sources
(listeners, an inherited connection, inetd stdin, a connected fd), keeps systemd informed, and
routes signals to operations. The only module that sees the whole tree."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from . import logs
from .backends.base import Backend
from .backends.cow import CowBackend
from .backends.file import FileBackend
from .backends.proxy import open_proxy_backend
from .backends.rbd import RbdBackend, RbdCluster, is_rbd
from .budget import Limits
from .config import Mode
from .connection import Connection, ServerState
from .control.server import serve_control
from .dial import RemoteAddress
from .export import Export
from .fdstore import ClientKeeper, FdStore, Handover, StoredClient
from .handoff import export_to_json, negotiated_from, receive_handoffs
from .lifetime import PidFile
from .listeners import PatientListener, describe, peer_name, to_trio_stream
from .operations import Operations
from .proto.messages import Negotiated, transmission_flags
from .remote import DEFAULT_TIMEOUT
from .rotational import is_rotational
from .signals import sigterm_came_early
from .snapshot import remove_partial_snapshots
from .systemd import Notifier
from .tls import ClientTLSOptions, ServerTLSOptions, server_tls
from .workers import Workers, default_workers, serves, start_message

log = logging.getLogger("xnbdd")

REFUSING_MAX = 64  # clients past --max-clients being told so at once; more are just closed
CACHED_CONTEXT = "x-xnbd:cached"  # block status: flag 1 = the block is in the local cache


@dataclass
class ServerOptions:
    """Everything the daemon needs, already validated by the command line."""

    mode: Mode
    image: str
    readonly: bool = False
    exportname: str | None = None
    description: str = ""
    oldstyle: bool = False
    max_queue_size: int = 0
    max_buf_size: int = 0
    handshake_timeout: float = 30.0
    max_clients: int = 0  # 0: no limit
    workers: int | None = None  # data-plane worker processes (workers.py); None: per CPU
    snapshot_rate: int = 0  # bytes per second of a background snapshot copy (0: no limit)
    cow_dir: str | None = None
    # proxy
    remote_host: str = ""
    remote_port: str = ""
    cache_bitmap: str = ""
    control_socket: str = ""
    target_exportname: str | None = None
    clear_bitmap: bool = False
    remote_timeout: float = DEFAULT_TIMEOUT
    remote_tls: ClientTLSOptions | None = None  # the origin link speaks TLS
    rbd: RbdCluster = field(default_factory=RbdCluster)  # for rbd:POOL/IMAGE images
    tls: ServerTLSOptions = field(default_factory=ServerTLSOptions)
    rotational: bool | None = None  # None: as the image's device says (rotational.py)
    pid_file: str = ""  # written once clients can connect, removed at exit
    # SIGHUP re-reads this file; keys given on the command line keep their values
    config: str | None = None
    command_line_keys: frozenset[str] = frozenset()


@dataclass
class ClientSources:
    """Where clients come from; prepared (bound, adopted) before the event loop starts."""

    listeners: list[socket.socket] = field(default_factory=list)
    connection: socket.socket | None = None  # one client, handshake still to do
    negotiated_fd: socket.socket | None = None  # one client, handshake already done
    handoff: socket.socket | None = None  # unix listener: clients negotiated by xnbd-wrapper
    control: socket.socket | None = None  # the control socket, when systemd passed it
    handover: Handover = field(default_factory=Handover)  # what the last process left us


class SingleExportCatalog:
    """xnbd-server serves one export. Without ``--exportname`` every name reaches it, as with the
    original (which ignored names); with it, only that name and the default name ""."""

    def __init__(self, export: Export, strict_name: bool) -> None:
        self.export = export
        self.strict_name = strict_name

    def lookup(self, name: str) -> Export | None:
        if not self.strict_name or name in ("", self.export.name):
            return self.export
        return None

    def exports(self) -> Sequence[Export]:
        return [self.export]


OVERLAY_KEY = "overlay"  # the cow overlay's name among the files kept in the fd store


def open_backend(
    opts: ServerOptions, handover: Handover | None = None
) -> FileBackend | CowBackend | RbdBackend:
    """The image (and a cow overlay: the one kept for ``handover``'s clients if there is one;
    clients whose overlay was not kept are closed, their writes would be lost)."""
    kept = handover.take_file(OVERLAY_KEY) if handover is not None else None
    if opts.mode is Mode.COW_TARGET and not opts.readonly and kept is not None:
        try:
            return CowBackend.adopt(opts.image, kept.fd, str(kept.info.get("path", "")))
        except (OSError, ValueError) as err:
            os.close(kept.fd)
            assert handover is not None
            handover.drop_clients(f"the overlay they wrote to was not kept ({err})")
    elif kept is not None:
        os.close(kept.fd)
    if handover is not None and handover.clients and opts.mode is Mode.COW_TARGET and kept is None:
        handover.drop_clients("the overlay they wrote to was not kept")
    if opts.mode is Mode.TARGET and is_rbd(opts.image):
        return RbdBackend.open(opts.image, opts.rbd, readonly=opts.readonly)
    if opts.mode is Mode.TARGET or (opts.mode is Mode.COW_TARGET and opts.readonly):
        # A read-only cow-target never writes, so it needs no overlay.
        return FileBackend.open(opts.image, readonly=opts.readonly)
    if opts.mode is Mode.COW_TARGET:
        return CowBackend.open(opts.image, cow_dir=opts.cow_dir)
    raise ValueError(f"{opts.mode} is not a file-backed mode")  # proxy: Daemon._open_backend


class Daemon:
    def __init__(self, opts: ServerOptions, sources: ClientSources) -> None:
        self.refusing = 0  # connections past --max-clients being refused
        self.opts = opts
        self.sources = sources
        limits = Limits(handshake_timeout=opts.handshake_timeout)
        if opts.max_queue_size:
            limits.max_requests = opts.max_queue_size
        if opts.max_buf_size:
            limits.max_bytes = opts.max_buf_size
        self.state = ServerState(limits, server_tls(opts.tls))  # TLSConfigError: one line
        self.state.changed = self._update_status
        self.notifier = Notifier()
        self.fdstore = FdStore.from_environment()
        self.ops = Operations(opts, self.state, self.notifier, self._update_status)
        self._stop_accepting = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.pid_file = PidFile(opts.pid_file) if opts.pid_file else None

    # -- life cycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            ops = self.ops
            backend = await self._open_backend(stack)
            name = self.opts.exportname or ""
            rotational = self.opts.rotational
            if rotational is None:
                rotational = is_rotational(self.opts.image)
            src = self.sources
            export = ops.export = Export(
                name,
                backend,
                description=self.opts.description,
                readonly=self.opts.readonly,
                rotational=rotational,
                one_connection=src.connection is not None or src.negotiated_fd is not None,
            )
            if ops.proxy is not None:
                export.extra_contexts[CACHED_CONTEXT] = ops.cached_extents
            catalog = SingleExportCatalog(export, strict_name=self.opts.exportname is not None)
            workers = self.state.workers = self._workers(export)
            logs.set_context(
                XNBD_EXPORT=name or os.path.basename(self.opts.image), XNBD_MODE=ops.mode
            )
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # READY=1 must not come before a SIGUSR1 or SIGHUP is handled (they kill)
                    await nursery.start(self._signals)
                    nursery.start_soon(self._watchdog)
                    nursery.start_soon(workers.run)
                    if ops.proxy is not None:
                        nursery.start_soon(ops.status_loop)
                    control = self.sources.control
                    if self.opts.control_socket or control is not None:
                        await nursery.start(
                            partial(serve_control, self.opts.control_socket, ops, sock=control)
                        )
                    await self._serve(catalog)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await export.backend.close()
                    self.notifier.close()
                    if self.pid_file is not None:
                        self.pid_file.remove()
        log.info("stopped")

    def _workers(self, export: Export) -> Workers:
        """Worker processes serve plain file, device and cow overlay exports of a daemon with more
        than one client source (workers.py); others (proxy, rbd) stay in this process."""
        count = self.opts.workers
        if count is None:
            count = default_workers()
        backend = export.backend
        if not serves(backend) or export.one_connection:
            count = 0
        limits = self.state.limits

        def start() -> tuple[dict[str, Any], list[int]]:
            # Every process, this one included, holds its share of --max-buf-size.
            total = limits.max_bytes * self.state.byte_shares
            self.state.byte_shares = count + 1
            limits.max_bytes = max(total // self.state.byte_shares, 1)
            return start_message(export, limits)

        return Workers(count, start, self.state.stopping, lambda: limits.shutdown_grace)

    async def _open_backend(self, stack: AsyncExitStack) -> Backend:
        opts = self.opts
        # snapshots a crash cut short: unfinished, and never part of the image
        await trio.to_thread.run_sync(remove_partial_snapshots, opts.image)
        if opts.mode is not Mode.PROXY:
            return await trio.to_thread.run_sync(open_backend, opts, self.sources.handover)
        remote = RemoteAddress(
            opts.remote_host, opts.remote_port, opts.target_exportname, tls=opts.remote_tls
        )
        proxy = self.ops.proxy = await stack.enter_async_context(
            open_proxy_backend(
                remote,
                opts.image,
                opts.cache_bitmap,
                readonly=opts.readonly,
                clear_bitmap=opts.clear_bitmap,
                timeout=opts.remote_timeout,
                rbd=opts.rbd,
            )
        )
        status = proxy.status()
        log.info(
            "proxy of %s: %d of %d blocks cached in %s",
            status.remote,
            status.cached_blocks,
            status.total_blocks,
            opts.image,
        )
        return proxy

    async def _serve(self, catalog: SingleExportCatalog) -> None:
        src = self.sources
        async with trio.open_nursery() as connections:
            # Clients handed over by the previous process go on before anything else is read.
            for stored in src.handover.clients:
                self._adopt(stored, catalog, connections)
            if src.negotiated_fd is not None:
                export = catalog.export
                info = export.info()
                negotiated = Negotiated(export=info, tx_flags=transmission_flags(info.tx_flags))
                stream = to_trio_stream(src.negotiated_fd)
                self._ready("serving one negotiated connection")
                await self._client(stream, catalog, negotiated)
                return
            if src.connection is not None:
                stream = to_trio_stream(src.connection)
                self._ready("serving one connection")
                await self._client(stream, catalog, None)
                return
            listeners = [PatientListener(sock) for sock in src.listeners]

            async def new_client(stream: trio.SocketStream) -> None:
                await self._client(stream, catalog, None, b"", self.fdstore.keeper())

            with self._stop_accepting:
                async with trio.open_nursery() as acceptors:
                    if listeners:
                        acceptors.start_soon(
                            partial(trio.serve_listeners, handler_nursery=connections),
                            new_client,
                            listeners,
                        )
                    if src.handoff is not None:
                        acceptors.start_soon(self._handoff_loop, src.handoff, catalog, connections)
                    where = ", ".join(
                        describe(sock)
                        for sock in [*src.listeners, *([src.handoff] if src.handoff else [])]
                    )
                    log.info("listening on %s", where)
                    self._ready(f"listening on {where}")
            for listener in listeners:
                await listener.aclose()
            # Connections finish on their own once ``state.stopping`` is set (grace period).
        backend = catalog.export.backend
        if self.fdstore.states and isinstance(backend, CowBackend):
            # The clients' writes live in the overlay: it goes with them, locked, unremoved.
            kept = {"path": backend.overlay_path}
            backend.keep_overlay = self.fdstore.keep_file(OVERLAY_KEY, backend.overlay.fd, kept)
        self.fdstore.commit()

    def _adopt(
        self, stored: StoredClient, catalog: SingleExportCatalog, nursery: trio.Nursery
    ) -> None:
        """Serve a client the previous process handed over, with what it negotiated then; one
        that negotiated what this process no longer offers (a read-only or mode change) is
        closed, and reconnects to negotiate again."""
        keeper = self.fdstore.keeper(stored.name)
        info = catalog.export.info()
        try:
            negotiated, pending = negotiated_from(info, stored.message)
            before = int(stored.message.get("tx_flags", int(negotiated.tx_flags)))
        except (TypeError, ValueError) as err:
            log.warning("stored client %s: unusable state (%s); closed", stored.name, err)
            before, negotiated, pending = -1, None, b""
        if negotiated is not None and before != int(negotiated.tx_flags):
            log.warning(
                "stored client %s: the export's flags changed across the restart (%#x -> %#x: "
                "read-only or mode); closed, it reconnects and negotiates again",
                stored.name,
                before,
                int(negotiated.tx_flags),
            )
            negotiated = None
        if negotiated is None:
            stored.sock.close()
            return
        stream = to_trio_stream(stored.sock)
        nursery.start_soon(self._client, stream, catalog, negotiated, pending, keeper)

    def _ready(self, what: str) -> None:
        if self.pid_file is not None:
            self.pid_file.write()  # OSError: a start-up failure, one line
        self.notifier.ready()
        self._update_status()
        log.info("ready: %s %s, %s", self.ops.mode, self.opts.image, what)

    async def _handoff_loop(
        self, sock: socket.socket, catalog: SingleExportCatalog, nursery: trio.Nursery
    ) -> None:
        """Clients negotiated by xnbd-wrapper continue here with what they negotiated."""
        export = catalog.export
        async for client, message in receive_handoffs(sock, lambda: export_to_json(export.info())):
            negotiated, pending = negotiated_from(export.info(), message)
            stream = to_trio_stream(client)
            keeper = self.fdstore.keeper()
            nursery.start_soon(self._client, stream, catalog, negotiated, pending, keeper)

    async def _client(
        self,
        stream: trio.SocketStream,
        catalog: SingleExportCatalog,
        negotiated: Negotiated | None,
        pending: bytes = b"",
        keeper: ClientKeeper | None = None,
    ) -> None:
        peer = peer_name(stream)
        fields = {"XNBD_CLIENT": peer}
        limit = self.opts.max_clients
        if limit and self.state.clients >= limit:
            await self._refuse(stream, catalog, peer, limit, negotiated is not None)
            return
        self.state.clients += 1
        self._update_status()
        log.info("client connected", extra=fields)
        try:
            connection = Connection(
                stream, catalog, self.state, peer=peer, oldstyle=self.opts.oldstyle, keeper=keeper
            )
            connection.pending = pending  # requests pipelined behind GO
            await connection.serve(negotiated)
        except Exception:
            # Whatever went wrong is this client's alone: log it, keep serving the others.
            log.exception("connection failed", extra=fields)
        finally:
            self.state.clients -= 1
            self._update_status()
            log.info("client disconnected", extra=fields)

    async def _refuse(
        self,
        stream: trio.SocketStream,
        catalog: SingleExportCatalog,
        peer: str,
        limit: int,
        negotiated: bool,
    ) -> None:
        """A client past ``--max-clients``: every option it sends gets NBD_REP_ERR_POLICY with
        the reason. Clients that cannot be told are closed: EXPORT_NAME, oldstyle, and those
        negotiated elsewhere (xnbd-wrapper's hand-off)."""
        noun = "client" if limit == 1 else "clients"
        reason = f"server busy: already {limit} {noun} connected (its --max-clients limit)"
        log.warning(
            "client refused: already %d %s (--max-clients)",
            limit,
            noun,
            extra={"XNBD_CLIENT": peer},
        )
        if negotiated or self.opts.oldstyle or self.refusing >= REFUSING_MAX:
            await trio.aclose_forcefully(stream)
            return
        self.refusing += 1  # bounded: refusals cannot hold more than this many sockets
        try:
            connection = Connection(stream, catalog, self.state, peer=peer, refusal=reason)
            await connection.serve(None)
        except Exception:
            log.exception("refusing a connection failed", extra={"XNBD_CLIENT": peer})
        finally:
            self.refusing -= 1

    def stop(self) -> None:
        if self.state.stopping.is_set():
            return
        # Every stop under a store is a handover: systemd keeps the sockets across a restart and
        # closes them when the service really stops (docs/handover.md).
        self.state.handover = self.fdstore.enabled
        if self.state.handover:
            log.info("stopping: answering requests in flight, handing clients over")
        else:
            log.info("stopping: finishing requests in flight")
        self.notifier.stopping()
        self.state.stopping.set()
        self._stop_accepting.cancel()
        if self.state.handover:
            self.ops.cut_cache_alls()

    def _update_status(self) -> None:
        self.notifier.status(self.ops.status_text())

    # -- signals and watchdog -------------------------------------------------------------------

    async def _signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
        with trio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            if sigterm_came_early():
                self.stop()
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.stop()
                elif signum == signal.SIGHUP:
                    self.ops.reload()
                elif signum == signal.SIGUSR1 and self._nursery is not None:
                    self._nursery.start_soon(self.ops.snapshot_logged)
                elif signum == signal.SIGUSR2 and self._nursery is not None:
                    self._nursery.start_soon(self.ops.switch_when_complete)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            # Sent from the event loop itself, so a wedged loop stops the pings.
            self.notifier.watchdog()
            await trio.sleep(interval)
