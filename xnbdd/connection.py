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

import errno
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import trio

from .backends.base import FileRange
from .dispatch import Buffers, error_reply, execute, execute_now
from .export import Export
from .proto.consts import Cmd, Errno
from .proto.errors import ProtocolError, RequestError
from .proto.handshake import HandshakeState, ServerHandshake
from .proto.messages import ExportInfo, Negotiated, Request
from .proto.transmission import RequestDecoder, check_request

log = logging.getLogger("xnbdd")

RECEIVE_SIZE = 64 * 1024  # per connection; large WRITE payloads bypass it (DIRECT_PAYLOAD)
MAX_IOV = 512  # buffers per writev, below the kernel's IOV_MAX of 1024
DIRECT_PAYLOAD = 64 * 1024  # WRITE payloads this large are received straight into their buffer
READS_PER_CHECKPOINT = 16  # socket reads without a pass through the trio scheduler
_DISC = int(Cmd.DISC)
_PAYLOAD_COMMANDS = frozenset({int(Cmd.READ), int(Cmd.WRITE)})


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
        if self._lot:  # waking nobody is a measurable cost at every reply
            self._lot.unpark_all()

    async def wait_idle(self) -> None:
        while self.requests:
            await self._lot.park()


class ReplyWriter:
    """The one sender of a connection. ``put`` is synchronous and queues a reply whole, so
    replies never interleave.

    On a socket, replies go out with ``writev`` of the queued buffers as they are (no copy of
    READ data): the reader calls ``send_now`` before it waits for more requests, which sends
    what the socket takes at once; ``run`` sends the rest when the socket is writable again. A
    reply's budget is released when its last byte is with the kernel.
    """

    def __init__(self, stream: trio.abc.Stream, budget: Budget) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._budget = budget
        # (what is still to send, budget to release after it: only on a reply's last part)
        self._queue: deque[tuple[memoryview | FileRange, int | None]] = deque()
        self._wake = trio.Event()
        self._closing = False
        self.broken = False

    def put(self, buffers: Buffers, cost: int, *, wake: bool = True) -> None:
        """Queue a reply. ``wake=False`` from the reader, which calls ``send_now`` before it
        waits: waking the writer task for a reply the reader sends itself is a wasted pass."""
        if self.broken:
            self._budget.release(cost)
            return
        parts = [b if isinstance(b, FileRange) else memoryview(b).cast("B") for b in buffers]
        parts = [p for p in parts if (p.length if isinstance(p, FileRange) else len(p))]
        last = len(parts) - 1
        self._queue.extend((part, cost if i == last else None) for i, part in enumerate(parts))
        if wake:
            self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def send_now(self) -> None:
        """Send without waiting whatever the socket accepts; the writer task does the rest
        (and meets any error, which ends the connection)."""
        if not self._queue or self.broken:
            return
        try:
            done = self._fd >= 0 and self._write_some()
        except OSError:
            done = False
        if not done:
            self._wake.set()

    def _write_some(self) -> bool:
        """writev (or sendfile for file ranges) until the queue is empty (True) or the socket
        is full (False)."""
        queue = self._queue
        while queue:
            head = queue[0][0]
            try:
                if isinstance(head, FileRange):
                    sent = os.sendfile(self._fd, head.fd, head.offset, head.length)
                    if not sent:  # the image shrank under us; the header is already out
                        raise OSError(errno.EIO, "image ended during a reply")
                else:
                    views = []
                    for part, _cost in islice(queue, MAX_IOV):
                        if isinstance(part, FileRange):
                            break
                        views.append(part)
                    sent = os.writev(self._fd, views)
            except BlockingIOError:
                return False
            while sent:
                part, cost = queue[0]
                size = part.length if isinstance(part, FileRange) else len(part)
                if sent >= size:
                    sent -= size
                    queue.popleft()
                    if cost is not None:
                        self._budget.release(cost)
                else:
                    if isinstance(part, FileRange):
                        rest: memoryview | FileRange = FileRange(
                            part.fd, part.offset + sent, part.length - sent
                        )
                    else:
                        rest = part[sent:]
                    queue[0] = (rest, cost)
                    sent = 0
        return True

    async def run(self, on_broken: trio.CancelScope) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wake.wait()
                    self._wake = trio.Event()
                elif self._fd < 0:
                    await self._send_stream()
                elif not self._write_some():
                    await trio.lowlevel.wait_writable(self._fd)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            while self._queue:
                _view, cost = self._queue.popleft()
                if cost is not None:
                    self._budget.release(cost)
            on_broken.cancel()

    async def _send_stream(self) -> None:
        """Streams without a socket (tests over memory streams): one send per batch."""
        batch = list(self._queue)
        self._queue.clear()
        data = b"".join(
            os.pread(part.fd, part.length, part.offset) if isinstance(part, FileRange) else part
            for part, _cost in batch
        )
        await self._stream.send_all(data)
        for _view, cost in batch:
            if cost is not None:
                self._budget.release(cost)


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
        self._receive_buffer = bytearray(RECEIVE_SIZE)
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._reads_since_checkpoint = 0
        self._spare_payload: bytearray | None = None
        self.budget = Budget(state)
        self.writer = ReplyWriter(stream, self.budget)

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
        fields = self._fields()
        while True:
            try:
                req = decoder.next_request()
                if req is None:
                    view = decoder.direct_payload(DIRECT_PAYLOAD, self._payload_buffer)
                    if view is not None:
                        if not await self._receive_into(view):
                            return "end of stream"
                        req = decoder.complete_payload()
            except ProtocolError as err:
                log.warning("closing connection: %s", err, extra=fields)
                return "framing lost"
            if req is None:
                self.writer.send_now()  # answer what is done before waiting for more
                if not await self._receive():
                    return "end of stream"
                continue
            if req.cmd == _DISC:
                return "disconnect requested"
            cost = req.length if req.cmd in _PAYLOAD_COMMANDS else 0
            await self.budget.acquire(cost)
            if self.state.stopping.is_set():
                self.writer.put(
                    error_reply(req, negotiated, Errno.ESHUTDOWN, "server shutting down"),
                    cost,
                    wake=False,
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
                self.writer.put(
                    error_reply(req, negotiated, err.errno, err.message), cost, wake=False
                )
                continue
            if export.try_admit():
                reply = execute_now(req, export, negotiated, fields)
                export.release()
                if reply is not None:
                    self.writer.put(reply, cost, wake=False)
                    if isinstance(req.data, bytearray):
                        self._spare_payload = req.data  # written and done with: reuse it
                    continue
            handlers.start_soon(self._handle, req, cost, export, negotiated)

    def _payload_buffer(self, length: int) -> bytearray:
        """A buffer for a large WRITE payload: the last one a WRITE answered inline released
        if the size matches (sequential writers repeat sizes), else a new one. Saves zeroing
        and faulting in a fresh megabyte per request."""
        spare, self._spare_payload = self._spare_payload, None
        return spare if spare is not None and len(spare) == length else bytearray(length)

    async def _receive(self) -> bool:
        """More bytes for the decoder; False at end of stream."""
        if self._fd < 0:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            self.decoder.receive_data(data)
            return bool(data)
        count = await self._read_socket(memoryview(self._receive_buffer))
        self.decoder.receive_data(memoryview(self._receive_buffer)[:count])
        return count > 0

    async def _receive_into(self, view: memoryview) -> bool:
        """Fill a WRITE payload straight from the socket; False at end of stream."""
        while len(view):
            if self._fd < 0:
                data = await self.stream.receive_some(len(view))
                count = len(data)
                view[:count] = data
            else:
                count = await self._read_socket(view)
            if not count:
                return False
            view = view[count:]
        return True

    async def _read_socket(self, view: memoryview) -> int:
        """readv, waiting for the socket only when it is empty. trio's recv_into would also
        pass through the scheduler after every successful read; at queue depth 1 that doubles
        the cost of a request. A checkpoint every few reads keeps a flooding client fair."""
        self._reads_since_checkpoint += 1
        if self._reads_since_checkpoint >= READS_PER_CHECKPOINT:
            self._reads_since_checkpoint = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return os.readv(self._fd, [view])
            except BlockingIOError:
                self._reads_since_checkpoint = 0
                await trio.lowlevel.wait_readable(self._fd)
            except OSError as err:  # reset, keepalive timeout...: the client is gone
                log.debug("client connection failed: %s", err, extra=self._fields())
                return 0

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
