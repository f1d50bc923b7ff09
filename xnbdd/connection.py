"""Serve one client: the handshake on the event loop, then the transmission phase.

The handshake is short and waits on the client, so it runs as a trio task. Transmission is the
hot path: it runs in a data-plane thread that owns the socket (``dataplane.DataPlane``), and the
event loop executes only the requests that must wait, as tasks in this connection's nursery. On
server shutdown the plane answers new requests with ESHUTDOWN and closes once the last reply is
out; whatever still runs after the grace period is cut. Under systemd with a file-descriptor store
the stop is a handover instead (fdstore.py): the plane stops at a request boundary with every
reply out, and the socket goes to the store, open, for the next process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import trio

from .backends.base import PendingRead
from .budget import ByteBudget, Limits
from .dataplane import HANDED_OVER, DataPlane
from .dispatch import execute, finish_read, guarded, read_reply
from .export import Export
from .fdstore import ClientKeeper
from .handoff import handoff_message
from .negotiation import negotiate
from .proto.consts import Cmd
from .proto.handshake import ExportRequested, ServerHandshake
from .proto.messages import ExportInfo, Negotiated, Request
from .tls import PlainTransport, ServerTLS, TLSChannel, TLSSession, TLSTransport, Transport
from .workers import Plane, RemotePlane, Workers

log = logging.getLogger("xnbdd")

# Data-plane threads are one per client connection, not a pool for short jobs: they must not
# take tokens from trio's default thread limiter, which the backends' blocking calls use.
PLANE_THREADS = trio.CapacityLimiter(1_000_000)

__all__ = ["Catalog", "Connection", "Limits", "ServerState"]


class Catalog(Protocol):
    """The exports a listener offers."""

    def lookup(self, name: str) -> Export | None: ...

    def exports(self) -> Sequence[Export]: ...


class ServerState:
    """What every connection of the daemon shares: limits, the byte budget, the shutdown signal
    and the client count."""

    def __init__(self, limits: Limits | None = None, tls: ServerTLS | None = None) -> None:
        self.limits = limits or Limits()
        self.budget = ByteBudget(self.limits)
        self.tls = tls or ServerTLS()
        self.stopping = trio.Event()
        self.handover = False  # set before ``stopping``: clients go to the fd store
        self.clients = 0
        self.tls_clients = 0  # connections whose STARTTLS succeeded
        self.connections: set[Connection] = set()  # for the control socket's query
        self.changed: Callable[[], None] = lambda: None  # the counts above changed (STATUS=)
        self.workers: Workers | None = None  # data-plane processes (workers.py)
        self.byte_shares = 1  # --max-buf-size is split between this many processes


def lift_send_cap(sock: trio.socket.SocketType) -> None:
    """trio caps a TCP socket's unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT, for interactive
    latency). Past the handshake the cap is wrong: the data plane queues its replies whole and
    the kernel should hold them. With it, 1 MiB reads went out in half-empty segments at 0.63x
    nbdkit; without, 0.96x at less CPU per MiB than nbdkit (bench/README.md). 0 is the system's
    default (net.ipv4.tcp_notsent_lowat)."""
    with contextlib.suppress(OSError):  # a unix socket has no TCP options
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)


class Connection:
    def __init__(
        self,
        stream: trio.SocketStream,
        catalog: Catalog,
        state: ServerState,
        *,
        peer: str = "",
        oldstyle: bool = False,
        refusal: str = "",
        keeper: ClientKeeper | None = None,
    ) -> None:
        self.stream = stream
        self.refusal = refusal  # refuse every option with this (a limit is reached)
        self.catalog = catalog
        self.state = state
        self.peer = peer
        self.oldstyle = oldstyle
        self.pending = b""  # bytes the client sent behind its handshake
        self.tls: TLSSession | None = None  # set once STARTTLS succeeded
        self.keeper = keeper  # its place in systemd's fd store, if there is one
        self.since = time.time()  # connected (or adopted from the previous process) at
        self.export_name: str | None = None  # set once negotiated
        self.asked_name: str | None = None  # the name the client asked for (any reaches us)
        self.worker: int | None = None  # the PID of the worker process serving it, if one is

    # -- handshake (the HandshakeHost of negotiation.py) ----------------------------------------

    async def find_export(self, event: ExportRequested) -> ExportInfo | None:
        export = self.catalog.lookup(event.name)
        if export is None:
            return None
        self.asked_name = event.name  # the last one asked for is the one GO serves
        return export.info()

    def list_exports(self) -> Iterable[ExportInfo]:
        return [export.info() for export in self.catalog.exports()]

    def shutting_down(self) -> bool:
        return self.state.stopping.is_set()

    async def handshake(self) -> Negotiated | None:
        """Negotiate; None when the client left, aborted, broke a MUST, failed its TLS
        handshake or timed out."""
        oldstyle = None
        if self.oldstyle:
            default = self.catalog.lookup("")
            if default is None:
                raise ValueError("oldstyle needs a default export")
            oldstyle = default.info()
        hs = ServerHandshake(oldstyle=oldstyle, tls=self.state.tls.policy, refusal=self.refusal)
        with trio.move_on_after(self.state.limits.handshake_timeout):
            try:
                result = await negotiate(hs, self.stream, self, self._fields())
            except ssl.SSLError as err:  # broken TLS records after the TLS handshake
                log.warning("TLS failed: %s", err.reason or err, extra=self._fields())
                return None
            if result is None:
                return None
            negotiated, pending = result
            self.pending += pending
            return negotiated
        log.info("handshake timed out", extra=self._fields())
        return None

    async def start_tls(self, early: bytes) -> TLSChannel | None:
        """The TLS handshake after STARTTLS's ACK; None (and ``self.tls`` None) when it
        failed."""
        context = self.state.tls.context
        assert context is not None  # the policy is not OFF
        session = TLSSession(context)
        if early:
            session.feed(early)  # a client that did not wait for the ACK
        channel = TLSChannel(self.stream, session)
        try:
            await channel.handshake()
        except ssl.SSLError as err:
            # Too late to go on in the clear (the ACK is out): the session ends (MUST).
            log.warning("TLS handshake failed: %s", err.reason or err, extra=self._fields())
            return None
        self.tls = session
        self.state.tls_clients += 1
        self.state.changed()
        log.info("TLS started: %s", session.describe(), extra=self._fields())
        return channel

    def describe(self) -> dict[str, object]:
        """What the control socket's query lists per connection; ``export`` is None while the
        client negotiates."""
        return {
            "client": self.peer,
            "export": self.export_name,
            "since": round(self.since, 3),
            "tls": self.tls is not None,
            "worker": self.worker,
        }

    def _fields(self) -> dict[str, str]:
        return {"XNBD_CLIENT": self.peer} if self.peer else {}

    # -- transmission ---------------------------------------------------------------------------

    async def serve(self, negotiated: Negotiated | None = None) -> None:
        """Run the whole connection. ``negotiated`` skips the handshake (``--connected-fd``)."""
        self.state.connections.add(self)
        try:
            if negotiated is None:
                async with trio.open_nursery() as nursery:
                    # A client still negotiating when the server stops is cut after the grace.
                    nursery.start_soon(self._cut_handshake_on_shutdown, nursery.cancel_scope)
                    negotiated = await self.handshake()
                    nursery.cancel_scope.cancel()
                if negotiated is None:
                    return
            export = self.catalog.lookup(negotiated.export.name)
            if export is None:
                return
            asked = self.asked_name
            self.export_name = negotiated.export.name if asked is None else asked
            await self._transmission(export, negotiated)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to answer
        finally:
            self.state.connections.discard(self)
            if self.tls is not None:
                self.state.tls_clients -= 1
            # Handed over, systemd holds the socket: closing our descriptor leaves it open.
            await trio.aclose_forcefully(self.stream)

    async def _cut_handshake_on_shutdown(self, scope: trio.CancelScope) -> None:
        await self.state.stopping.wait()
        if not self.state.handover:  # a restart does not wait for them: they retry
            await trio.sleep(self.state.limits.shutdown_grace)
        scope.cancel()

    async def _transmission(self, export: Export, negotiated: Negotiated) -> None:
        """Serve here or in a worker process (workers.py); a connection moves between them at a
        request boundary (``HANDED_OVER``), and a stop's handover ends in the fd store."""
        lift_send_cap(self.stream.socket)
        workers = self.state.workers
        movable = workers is not None and bool(workers.count) and self.tls is None
        pending = self.pending
        while True:
            remote = None
            if workers is not None and movable:
                fd = self.stream.socket.fileno()
                remote = workers.assign(fd, negotiated, pending, self.peer)
            if remote is not None:
                reason = await self._serve_remote(remote)
            else:
                reason = await self._serve_here(export, negotiated, pending, movable)
            pending = b""  # a plane hands over with every byte read taken
            log.debug("transmission ended: %s", reason, extra=self._fields())
            if reason != HANDED_OVER:
                return
            state = self.state
            if state.stopping.is_set() and state.handover and self.keeper is not None:
                self._hand_over(negotiated)
                return
            # moved between this process and a worker (a snapshot's recall, or spreading)

    async def _serve_remote(self, remote: RemotePlane) -> str:
        self.worker = remote.worker.pid
        try:
            async with trio.open_nursery() as tasks:
                tasks.start_soon(self._watch_shutdown, remote)
                try:
                    return await remote.run()
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            self.worker = None

    async def _serve_here(
        self, export: Export, negotiated: Negotiated, pending: bytes, movable: bool
    ) -> str:
        fields = self._fields()
        token = trio.lowlevel.current_trio_token()
        workers = self.state.workers
        async with trio.open_nursery() as tasks:

            def submit(req: Request, cost: int) -> None:  # called by the plane's thread
                token.run_sync_soon(self._start, plane, req, cost, export, negotiated, tasks)

            fd = self.stream.socket.fileno()
            transport: Transport = (
                PlainTransport(fd) if self.tls is None else TLSTransport(fd, self.tls)
            )
            plane = DataPlane(
                transport,
                export,
                negotiated,
                self.state.limits,
                self.state.budget,
                submit,
                pending=pending,
                fields=fields,
            )
            tasks.start_soon(self._watch_shutdown, plane)
            if workers is not None and movable:
                workers.local[self] = plane  # to be moved out once workers run
            try:
                return await trio.to_thread.run_sync(plane.run, limiter=PLANE_THREADS)
            finally:
                if workers is not None:
                    workers.local.pop(self, None)
                tasks.cancel_scope.cancel()  # the watcher, and tasks of a plane that was cut

    def _hand_over(self, negotiated: Negotiated) -> None:
        keeper = self.keeper
        message = handoff_message(negotiated)
        message["tx_flags"] = int(negotiated.tx_flags)  # to see what a restart changed
        if keeper is not None and keeper.hand_over(self.stream.socket.fileno(), message):
            log.info("client handed over to the service manager", extra=self._fields())

    async def _watch_shutdown(self, plane: Plane) -> None:
        """Tell the plane when the server stops; cut it after the grace period (or at once if
        this task is cancelled while the plane still runs)."""
        try:
            await self.state.stopping.wait()
            # A TLS session lives in this process and cannot follow its socket: such a client
            # gets ESHUTDOWN and reconnects, as at a stop (docs/handover.md).
            if self.state.handover and self.keeper is not None and self.tls is None:
                plane.request_handover()
            else:
                plane.request_stop()
            await trio.sleep(self.state.limits.shutdown_grace)
        finally:
            plane.abort()

    def _start(
        self,
        plane: DataPlane,
        req: Request,
        cost: int,
        export: Export,
        negotiated: Negotiated,
        tasks: trio.Nursery,
    ) -> None:
        """On the event loop, a request the plane could not answer itself: a cold proxy read's
        fetch leaves here, before any task runs (a task's start and its way down to the
        origin link cost more than the rest of the read); everything else gets a task."""
        pending = self._start_read(req, export)
        if pending is None:
            tasks.start_soon(self._handle, plane, req, cost, export, negotiated)
            return
        early = _EarlyRead(plane, req, cost, negotiated)
        pending.when_data(early.answer)
        tasks.start_soon(self._finish_read, early, pending, export)

    def _start_read(self, req: Request, export: Export) -> PendingRead | None:
        """The read started by the backend (admitted at the gate), or None."""
        reader = export.starts_reads
        if reader is None or req.cmd != Cmd.READ or not req.length or not export.try_admit():
            return None
        try:
            pending = reader.start_read(req.offset, req.length)
        except Exception:  # a bug must cost this request's fast path, never the event loop
            log.exception("internal error starting a read", extra=self._fields())
            pending = None
        if pending is None:
            export.release()
        return pending

    async def _finish_read(self, early: _EarlyRead, pending: PendingRead, export: Export) -> None:
        req, negotiated = early.req, early.negotiated
        try:
            reading = finish_read(req, negotiated, pending)
            reply = await guarded(req, negotiated, self._fields(), reading)
        finally:
            export.release()
        if not early.answered:
            early.plane.complete(reply, early.cost)

    async def _handle(
        self, plane: DataPlane, req: Request, cost: int, export: Export, negotiated: Negotiated
    ) -> None:
        await export.admit()
        fields = self._fields()
        try:
            reply = await guarded(req, negotiated, fields, execute(req, export, negotiated, fields))
        finally:
            export.release()
        plane.complete(reply, cost)


class _EarlyRead:
    """A READ whose backend started it at once: answered the moment its data is there (from
    the origin link's reply), its task finishing the rest (the proxy storing the blocks)."""

    __slots__ = ("answered", "cost", "negotiated", "plane", "req")

    def __init__(self, plane: DataPlane, req: Request, cost: int, negotiated: Negotiated) -> None:
        self.plane = plane
        self.req = req
        self.cost = cost
        self.negotiated = negotiated
        self.answered = False

    def answer(self, data: memoryview) -> None:
        """Called by the origin link's reader: a bug here must not end the link, and leaves
        the answer to the task."""
        try:
            reply = read_reply(self.req, self.negotiated, data)
        except Exception:
            log.exception("internal error answering a read early")
            return
        self.answered = True
        self.plane.complete(reply, self.cost)
