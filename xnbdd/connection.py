"""Serve one client: the handshake, then pipelined transmission.

Shape of a connection (one reader, many handlers, one writer):
- the reader parses requests and starts a handler per request in the connection's nursery; it
  stops reading the socket while the in-flight limits (requests, bytes) are reached, which is real
  backpressure: the client's TCP window closes;
- handlers run on the export and hand their reply, whole, to the writer; replies may complete out
  of order, and the writer sends whatever has accumulated in one system call;
- on server shutdown new requests get ESHUTDOWN, running ones finish, and after a grace period the
  connection is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from .dispatch import Buffers, error_reply, execute
from .export import Export
from .proto.consts import Cmd, Errno
from .proto.errors import ProtocolError, RequestError
from .proto.handshake import HandshakeState, ServerHandshake
from .proto.messages import ExportInfo, Negotiated, Request
from .proto.transmission import RequestDecoder, check_request

log = logging.getLogger("xnbdd")

RECEIVE_SIZE = 256 * 1024
MAX_IOV = 512  # buffers per sendmsg, below the kernel's IOV_MAX of 1024


class Catalog(Protocol):
    """The exports a listener offers."""

    def lookup(self, name: str) -> Export | None: ...

    def exports(self) -> Sequence[Export]: ...


@dataclass
class Limits:
    """Per-connection bounds; ``--max-queue-size`` / ``--max-buf-size`` (0 keeps the default)."""

    max_requests: int = 256
    max_bytes: int = 128 * 1024 * 1024
    handshake_timeout: float = 30.0
    shutdown_grace: float = 5.0


class ServerState:
    """What every connection of the daemon shares: the shutdown signal and live counters."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.stopping = trio.Event()
        self.clients = 0
        self.queued_requests = 0
        self.queued_bytes = 0


class Budget:
    """Requests and bytes in flight on one connection; ``acquire`` waits when full."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._limits = state.limits
        self.requests = 0
        self.bytes = 0
        self._lot = trio.lowlevel.ParkingLot()

    def _full(self, cost: int) -> bool:
        if self.requests >= self._limits.max_requests:
            return True
        # One request larger than the whole byte limit still runs, alone.
        return self.bytes > 0 and self.bytes + cost > self._limits.max_bytes

    async def acquire(self, cost: int) -> None:
        while self._full(cost):
            await self._lot.park()
        self.requests += 1
        self.bytes += cost
        self._state.queued_requests += 1
        self._state.queued_bytes += cost

    def release(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self._state.queued_requests -= 1
        self._state.queued_bytes -= cost
        self._lot.unpark_all()

    async def wait_idle(self) -> None:
        while self.requests:
            await self._lot.park()


class ReplyWriter:
    """The one sender of a connection. ``put`` is synchronous, so replies never interleave."""

    def __init__(self, stream: trio.abc.Stream, budget: Budget) -> None:
        self._stream = stream
        self._budget = budget
        self._pending: list[bytes | bytearray | memoryview] = []
        self._costs: list[int] = []
        self._wake = trio.Event()
        self._closing = False
        self.broken = False

    def put(self, buffers: Buffers, cost: int) -> None:
        if self.broken:
            self._budget.release(cost)
            return
        self._pending.extend(buffers)
        self._costs.append(cost)
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def run(self, on_broken: trio.CancelScope) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._pending:
                batch, self._pending = self._pending, []
                costs, self._costs = self._costs, []
                try:
                    await self._send(batch)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.broken = True
                    on_broken.cancel()
                finally:
                    for cost in costs:
                        self._budget.release(cost)
            if self._closing and not self._pending:
                return

    async def _send(self, batch: list[bytes | bytearray | memoryview]) -> None:
        if not isinstance(self._stream, trio.SocketStream):
            await self._stream.send_all(b"".join(batch))
            return
        # sendmsg with the buffers as they are: no copy of READ data into one big string.
        sock = self._stream.socket
        views = [memoryview(b).cast("B") for b in batch if len(b)]
        while views:
            sent = await sock.sendmsg(views[:MAX_IOV])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0


class Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        catalog: Catalog,
        state: ServerState,
        *,
        peer: str = "",
        oldstyle: bool = False,
    ) -> None:
        self.stream = stream
        self.catalog = catalog
        self.state = state
        self.peer = peer
        self.oldstyle = oldstyle
        self.decoder = RequestDecoder()
        self.budget = Budget(state)
        self.writer = ReplyWriter(stream, self.budget)
        self.export: Export | None = None
        self.negotiated: Negotiated | None = None

    # -- handshake ------------------------------------------------------------------------------

    def _lookup(self, name: str) -> ExportInfo | None:
        export = self.catalog.lookup(name)
        return export.info() if export is not None else None

    def _list(self) -> list[ExportInfo]:
        return [export.info() for export in self.catalog.exports()]

    async def handshake(self) -> Negotiated | None:
        """Negotiate; None when the client left, aborted, broke a MUST or timed out."""
        hs = ServerHandshake(self._lookup, self._list, oldstyle=self.oldstyle)
        with trio.move_on_after(self.state.limits.handshake_timeout):
            while True:
                out = hs.data_to_send()
                if out:
                    await self.stream.send_all(out)
                if hs.state is HandshakeState.DONE:
                    self.decoder.receive_data(hs.leftover())
                    return hs.negotiated
                if hs.state is HandshakeState.CLOSED:
                    log.debug("handshake ended: %s", hs.close_reason, extra=self._fields())
                    return None
                data = await self.stream.receive_some(4096)
                if not data:
                    return None
                hs.shutting_down = self.state.stopping.is_set()
                hs.receive_data(data)
        log.info("handshake timed out", extra=self._fields())
        return None

    def _fields(self) -> dict[str, str]:
        return {"XNBD_CLIENT": self.peer} if self.peer else {}

    # -- transmission ---------------------------------------------------------------------------

    async def serve(self, negotiated: Negotiated | None = None) -> None:
        """Run the whole connection. ``negotiated`` skips the handshake (``--connected-fd``)."""
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
            self.export, self.negotiated = export, negotiated
            await self._transmission(export, negotiated)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to answer
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _cut_handshake_on_shutdown(self, scope: trio.CancelScope) -> None:
        await self.state.stopping.wait()
        await trio.sleep(self.state.limits.shutdown_grace)
        scope.cancel()

    async def _transmission(self, export: Export, negotiated: Negotiated) -> None:
        async with trio.open_nursery() as outer:
            reader_scope = trio.CancelScope()
            outer.start_soon(self.writer.run, reader_scope)
            watcher = trio.CancelScope()
            outer.start_soon(self._watch_shutdown, watcher, reader_scope)
            handlers_scope = trio.CancelScope()
            with handlers_scope:
                async with trio.open_nursery() as handlers:
                    with reader_scope:
                        reason = await self._read_requests(handlers, export, negotiated)
                        log.debug("reader stopped: %s", reason, extra=self._fields())
                    # Handlers still running finish here; after the grace period they are cut.
                    handlers_scope.deadline = trio.current_time() + self.state.limits.shutdown_grace
            self.writer.close()
            watcher.cancel()

    async def _watch_shutdown(self, scope: trio.CancelScope, reader: trio.CancelScope) -> None:
        with scope:
            await self.state.stopping.wait()
            with trio.move_on_after(self.state.limits.shutdown_grace):
                await self.budget.wait_idle()
            reader.cancel()

    async def _read_requests(
        self, handlers: trio.Nursery, export: Export, negotiated: Negotiated
    ) -> str:
        decoder = self.decoder
        while True:
            try:
                req = decoder.next_request()
            except ProtocolError as err:
                log.warning("closing connection: %s", err, extra=self._fields())
                return "framing lost"
            if req is None:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return "end of stream"
                decoder.receive_data(data)
                continue
            if req.cmd == Cmd.DISC:
                return "disconnect requested"
            cost = req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0
            await self.budget.acquire(cost)
            if self.state.stopping.is_set():
                self.writer.put(
                    error_reply(req, negotiated, Errno.ESHUTDOWN, "server shutting down"), cost
                )
                continue
            try:
                check_request(
                    req,
                    size=export.size,
                    tx_flags=negotiated.tx_flags,
                    structured=negotiated.structured,
                    has_contexts=bool(negotiated.meta_contexts),
                    max_payload=decoder.max_payload,
                )
            except RequestError as err:
                self.writer.put(error_reply(req, negotiated, err.errno, err.message), cost)
                continue
            handlers.start_soon(self._handle, req, cost, export, negotiated)

    async def _handle(
        self, req: Request, cost: int, export: Export, negotiated: Negotiated
    ) -> None:
        reply: Buffers
        await export.admit()
        try:
            reply = await execute(req, export, negotiated, self._fields())
        except Exception:
            # A bug must cost this request, not the connection or the daemon.
            log.exception("internal error serving a request", extra=self._fields())
            reply = error_reply(req, negotiated, Errno.EIO, "internal error")
        finally:
            export.release()
        self.writer.put(reply, cost)
