"""One negotiated connection to the proxy's origin: requests in, replies dispatched.

Requests come from the event loop (``RemoteLink.read`` and ``block_status`` await them) or from
other threads (``start_read``: the proxy's cold reads, sent by a connection's data-plane thread
so that the event loop is not between the client and the origin). On a plain socket every
request is written at once by the thread that makes it, under the connection's lock; replies are
read on the event loop, which hands a thread's read to its callback without a task. Such a read
is not retried here: a lost connection, a timeout or an error reply goes to the callback, and
the caller decides (the proxy retries on the event loop). A TLS connection takes requests from
the event loop only. The self-healing link around it is ``remote.RemoteLink``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from contextlib import suppress

import trio

from .listeners import STREAM_ERRORS
from .proto.client import Connected
from .proto.client_transmission import (
    BlockStatus,
    ClientTransmission,
    ReadData,
    ReplyDone,
    ReplyEvent,
)
from .proto.consts import Cmd
from .proto.errors import NBDError

log = logging.getLogger("xnbdd.remote")

RECEIVE_SIZE = 256 * 1024
CLOSE_TIMEOUT = 1.0
SEND_STALL = 1.0  # seconds the event loop waits for room in a plain socket's send buffer


class ConnectionLost(Exception):
    """The connection carrying a request went away; the request may be retried elsewhere."""


class OriginConnectionLost(OSError):
    """A thread's read (``start_read``) lost its connection; it may be sent again."""


# A thread's read is answered by a call on the event loop's thread: (data, None) or (None, error).
ReadCallback = Callable[[bytearray | None, OSError | None], None]


def eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class Call:
    """One request waiting for its reply (READ: ``buffer``; BLOCK_STATUS: ``extents`` of the
    context ``context_id``)."""

    def __init__(self, offset: int, length: int, context_id: int | None = None) -> None:
        self.offset = offset
        self.buffer = bytearray(length)  # holes need nothing: they are already zeros
        self.context_id = context_id
        self.extents: list[tuple[int, int]] = []  # (length, flags)
        self.error = 0
        self.lost = False
        self.done = trio.Event()
        self.callback: ReadCallback | None = None  # a thread's read: answered through this
        self.started = 0.0  # time.monotonic() when a thread's read was sent

    def finish(self) -> None:
        """The reply is complete (or the connection lost): wake the waiter. Event loop only."""
        callback = self.callback
        if callback is None:
            self.done.set()
            return
        self.callback = None
        if self.lost:
            callback(None, OriginConnectionLost(errno.ECONNRESET, "origin connection lost"))
        elif self.error:
            message = f"origin answered READ at {self.offset}+{len(self.buffer)} with an error"
            callback(None, OSError(self.error, message))
        else:
            callback(self.buffer, None)


class OriginConnection:
    """One negotiated connection: a reader task dispatches replies to waiting calls."""

    def __init__(
        self, stream: trio.abc.Stream, info: Connected, leftover: bytes, timeout: float
    ) -> None:
        self.stream = stream
        self.info = info
        self.tx = ClientTransmission(
            info.tx_flags, info.structured, info.max_payload, extended=info.extended
        )
        self.calls: dict[int, Call] = {}
        self.send_lock = trio.Lock()
        # Cookies, the encoder and (on a plain socket) the socket's send side are shared with
        # threads calling ``start_read``: guarded by this lock, never held across an await.
        self.lock = threading.Lock()
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self.token = trio.lowlevel.current_trio_token()
        self.loop_thread = threading.get_ident()
        self.timeout = timeout
        self.last_receive = trio.current_time()
        self.last_receive_at = time.monotonic()  # the same, on the clock threads can read
        self.dead = False
        self._next_cookie = 1
        self._leftover = leftover
        self._killed = trio.Event()
        self._disconnecting = False

    def kill(self, reason: str, *, expected: bool = False) -> None:
        if not self._killed.is_set():
            (log.info if expected else log.warning)("origin connection ended: %s", reason)
        self.dead = True
        self._killed.set()

    def _kill_from_any_thread(self, reason: str) -> None:
        self.dead = True  # no request is sent on it any more, from now
        if threading.get_ident() == self.loop_thread:
            self.kill(reason)
        else:
            with suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.kill, reason)

    async def serve(self) -> None:
        """Read replies until the connection dies; then every waiting call is marked lost."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                if self.fd >= 0:
                    nursery.start_soon(self._expire_thread_reads)
                await self._killed.wait()
                nursery.cancel_scope.cancel()
        finally:
            with self.lock:  # no thread sends on the socket once it is marked dead
                self.dead = True
                calls = list(self.calls.values())
                self.calls.clear()
            for call in calls:
                call.lost = True
                self._finish(call)
            with trio.CancelScope(shield=True):
                await close_quietly(self.stream)

    @staticmethod
    def _finish(call: Call) -> None:
        try:
            call.finish()
        except Exception:  # a caller's bug must not end the link for everyone
            log.exception("a read's callback failed")

    async def _expire_thread_reads(self) -> None:
        """Threads' reads have no task to time out: fail those older than the timeout (EIO),
        and drop the connection if nothing at all arrived since they were sent."""
        step = min(1.0, self.timeout / 4)
        while True:
            await trio.sleep(step)
            now = time.monotonic()
            with self.lock:
                expired = [
                    (cookie, call)
                    for cookie, call in self.calls.items()
                    if call.callback is not None and now - call.started >= self.timeout
                ]
                for cookie, _call in expired:
                    del self.calls[cookie]
            for _cookie, call in expired:
                callback, call.callback = call.callback, None
                assert callback is not None
                try:
                    callback(None, eio(f"origin: no answer within {self.timeout}s"))
                except Exception:
                    log.exception("a read's callback failed")
            if any(self.last_receive_at < call.started for _cookie, call in expired):
                self.kill(f"no reply for {self.timeout}s")

    async def _read_loop(self) -> None:
        try:
            if self._leftover:
                self._dispatch(self.tx.receive_data(self._leftover))
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self.last_receive = trio.current_time()
                self.last_receive_at = time.monotonic()
                if not data:
                    self.kill("origin closed the connection", expected=self._disconnecting)
                    return
                with self.lock:  # the encoder records the requests threads send
                    events = self.tx.receive_data(data)
                self._dispatch(events)
        except NBDError as exc:
            self.kill(f"protocol error from origin: {exc}")
        except STREAM_ERRORS as exc:
            self.kill(f"receive failed: {exc!r}")

    def _dispatch(self, events: list[ReplyEvent]) -> None:
        for event in events:
            call = self.calls.get(event.cookie)
            if call is None:
                continue  # a request that timed out or was cancelled: its reply is dropped
            if isinstance(event, ReadData):
                start = event.offset - call.offset
                call.buffer[start : start + len(event.data)] = event.data
            elif isinstance(event, BlockStatus):
                if event.context_id == call.context_id:
                    call.extents.extend(event.extents)
            elif isinstance(event, ReplyDone):
                call.error = event.error
                del self.calls[event.cookie]
                self._finish(call)

    async def read(self, offset: int, length: int) -> bytearray:
        call = await self._call(Cmd.READ, Call(offset, length), length)
        return call.buffer

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from ``offset``: a prefix of the range, or
        a little past its end (the caller clips)."""
        context_id = self.info.allocation_id
        assert context_id is not None
        call = await self._call(Cmd.BLOCK_STATUS, Call(offset, 0, context_id), length)
        return call.extents

    def start_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        """From any thread: send a READ now; ``callback`` gets its answer on the event loop's
        thread. False: nothing was sent (a TLS link, or the connection is going away)."""
        if self.fd < 0:
            return False
        call = Call(offset, length)
        call.callback = callback
        call.started = time.monotonic()
        with self.lock:
            if self.dead:
                return False
            cookie = self._register(Cmd.READ, call, length)
            try:
                wire = self.tx.request(Cmd.READ, cookie, offset, length)
                self._send_now(memoryview(wire))
            except (ConnectionLost, NBDError):
                self.calls.pop(cookie, None)
                return False
        return True

    def _register(self, command: Cmd, call: Call, length: int) -> int:
        cookie = self._next_cookie
        self._next_cookie += 1
        self.calls[cookie] = call
        return cookie

    def _send_now(self, wire: memoryview) -> None:
        """Write a whole request to the plain socket (the caller holds ``lock``). Requests are
        small, so the socket takes them at once unless the origin has stopped reading: then
        wait for room and give the connection up after ``timeout`` seconds (``SEND_STALL`` on
        the event loop's thread, which must not stop for long; the requests are sent again
        on the next connection)."""
        limit = self.timeout
        if threading.get_ident() == self.loop_thread:
            limit = min(limit, SEND_STALL)
        deadline = 0.0
        while wire:
            try:
                wire = wire[os.write(self.fd, wire) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                self._kill_from_any_thread(f"send failed: {exc!r}")
                raise ConnectionLost from exc
            now = time.monotonic()
            deadline = deadline or now + limit
            if now >= deadline:
                self._kill_from_any_thread("send timed out")
                raise ConnectionLost
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            poller.poll((deadline - now) * 1000)

    async def _call(self, command: Cmd, call: Call, length: int) -> Call:
        if self.dead:
            raise ConnectionLost
        if self.fd >= 0:
            with self.lock:
                if self.dead:
                    raise ConnectionLost
                cookie = self._register(command, call, length)
                wire = self.tx.request(command, cookie, call.offset, length)
                self._send_now(memoryview(wire))
        else:
            async with self.send_lock:
                if self.dead:
                    raise ConnectionLost
                with self.lock:
                    cookie = self._register(command, call, length)
                    wire = self.tx.request(command, cookie, call.offset, length)
                await self._send(wire)
        try:
            await call.done.wait()
        finally:
            self.calls.pop(cookie, None)
        if call.lost:
            raise ConnectionLost
        if call.error:
            raise OSError(
                call.error,
                f"origin answered {command.name} at {call.offset}+{length} with an error",
            )
        return call

    async def _send(self, wire: bytes) -> None:
        # A half-sent request would corrupt the stream for everyone: the send is shielded from
        # cancellation, bounded by the timeout so a stuck origin cannot hang us
        # (docs/decisions.md D15).
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.timeout) as scope:
                try:
                    await self.stream.send_all(wire)
                except STREAM_ERRORS as exc:
                    self.kill(f"send failed: {exc!r}")
                    raise ConnectionLost from exc
            if scope.cancelled_caught:
                self.kill("send timed out")
                raise ConnectionLost

    async def disconnect(self) -> None:
        """Polite NBD_CMD_DISC (best effort, bounded), then the connection ends."""
        if self.dead:
            return
        self._disconnecting = True
        if self.fd >= 0:
            with self.lock, suppress(ConnectionLost, NBDError):
                if not self.dead:
                    self._send_now(memoryview(self.tx.request(Cmd.DISC, 0)))
        else:
            with trio.move_on_after(1.0):
                async with self.send_lock:
                    with suppress(*STREAM_ERRORS, NBDError):
                        await self.stream.send_all(self.tx.request(Cmd.DISC, 0))
        self.kill("disconnected", expected=True)


async def close_quietly(stream: trio.abc.Stream) -> None:
    # A TLS stream sends close_notify first, which a stuck origin may never take: bounded (a
    # cancelled close still closes the socket).
    with suppress(*STREAM_ERRORS):
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()
