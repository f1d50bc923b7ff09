"""Async link to the proxy's origin NBD server: connect, read, survive outages.

Fixes of the original's upstream handling (docs/decisions.md D15-D19):
- every request has its own cookie; many are in flight and complete in any order;
- a request never waits longer than ``timeout`` seconds in total (across outages): then it fails
  with EIO; while the link is known to be down for longer than that, requests fail at once;
- an error reply fails only the request it answers; a lost connection is re-established in the
  background with exponential backoff, and the requests it carried are sent again (reads are
  idempotent);
- a request that finds the link down does not wait for the backoff timer: it asks for an attempt
  right then, so an origin that came back at the same address serves the very next read; while
  the link has been down longer than ``timeout`` a request fails as soon as that one attempt
  has failed (docs/faults.md);
- ``reconnect`` switches to another origin after checking that it exports the same size.

The wire protocol lives in ``xnbdd.proto.client`` and ``client_transmission``; this module only
moves its bytes.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from enum import Enum

import trio

from .dial import (
    DEFAULT_CONNECT_TIMEOUT,
    RECEIVE_SIZE,
    RemoteAddress,
    close_quietly,
    open_connection,
)
from .listeners import STREAM_ERRORS
from .proto.client import Connected
from .proto.client_transmission import (
    BlockStatus,
    ClientTransmission,
    ReadData,
    ReplyDone,
    ReplyEvent,
)
from .proto.consts import Cmd, TxFlag
from .proto.errors import NBDError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class LinkState(Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # down, retrying; requests still wait
    FAILED = "failed"  # down for longer than the timeout; a request fails when its attempt does
    CLOSED = "closed"


class SizeMismatchError(OSError):
    """The origin exports another size than the one this link was bound to."""


class _ConnectionLost(Exception):
    """The connection carrying a request went away; the request may be retried elsewhere."""


def _eio(message: str) -> OSError:
    return OSError(errno.EIO, message)


class _Call:
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
        self.cookie = 0
        # told the data the moment the reply is whole, before the waiting task runs
        self.on_data: Callable[[bytearray], None] | None = None


class StartedRead:
    """A READ sent by ``RemoteLink.start_read``; ``when_whole`` may be told its data at once."""

    __slots__ = ("at", "call", "conn")

    def __init__(self, conn: _Connection, call: _Call, at: float) -> None:
        self.conn = conn
        self.call = call
        self.at = at

    def when_whole(self, callback: Callable[[bytearray], None]) -> None:
        """``callback(data)`` on the event loop as soon as the reply is whole and not an
        error (before ``finish_read`` returns); never if the request is retried."""
        self.call.on_data = callback


class _Connection:
    """One negotiated connection: a reader task dispatches replies to waiting calls."""

    def __init__(
        self, stream: trio.abc.Stream, info: Connected, leftover: bytes, timeout: float
    ) -> None:
        self.stream = stream
        self.info = info
        self.tx = ClientTransmission(
            info.tx_flags, info.structured, info.max_payload, extended=info.extended
        )
        self.calls: dict[int, _Call] = {}
        self.send_lock = trio.Lock()
        self.timeout = timeout
        self.last_receive = trio.current_time()
        self.dead = False
        self._next_cookie = 1
        self._leftover = leftover
        self._killed = trio.Event()
        self._disconnecting = False

    def kill(self, reason: str, *, expected: bool = False) -> None:
        if not self.dead:
            (log.info if expected else log.warning)("origin connection ended: %s", reason)
        self.dead = True
        self._killed.set()

    async def serve(self) -> None:
        """Read replies until the connection dies; then every waiting call is marked lost."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                await self._killed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.dead = True
            for call in self.calls.values():
                call.lost = True
                call.done.set()
            self.calls.clear()
            with trio.CancelScope(shield=True):
                await close_quietly(self.stream)

    async def _read_loop(self) -> None:
        try:
            if self._leftover:
                self._dispatch(self.tx.receive_data(self._leftover))
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self.last_receive = trio.current_time()
                if not data:
                    self.kill("origin closed the connection", expected=self._disconnecting)
                    return
                self._dispatch(self.tx.receive_data(data))
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
                if call.on_data is not None and not call.error:
                    call.on_data(call.buffer)
                call.done.set()

    async def read(self, offset: int, length: int) -> bytearray:
        call = await self._call(Cmd.READ, _Call(offset, length), length)
        return call.buffer

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from ``offset``: a prefix of the range, or
        a little past its end (the caller clips)."""
        context_id = self.info.allocation_id
        assert context_id is not None
        call = await self._call(Cmd.BLOCK_STATUS, _Call(offset, 0, context_id), length)
        return call.extents

    async def _call(self, command: Cmd, call: _Call, length: int) -> _Call:
        if self.dead:
            raise _ConnectionLost
        async with self.send_lock:
            if self.dead:
                raise _ConnectionLost
            call.cookie = cookie = self._next_cookie
            self._next_cookie += 1
            wire = self.tx.request(command, cookie, call.offset, length)
            self.calls[cookie] = call
            await self._send(wire)
        return await self.wait_for(call, command, length)

    async def wait_for(self, call: _Call, command: Cmd, length: int) -> _Call:
        """A request sent on this connection, once answered; raises what the answer said."""
        try:
            await call.done.wait()
        finally:
            self.calls.pop(call.cookie, None)
        if call.lost:
            raise _ConnectionLost
        if call.error:
            raise OSError(
                call.error,
                f"origin answered {command.name} at {call.offset}+{length} with an error",
            )
        return call

    def send_read_now(self, call: _Call) -> bool:
        """Send a READ from the event loop's thread without waiting (no task needs to run
        first); False, and nothing sent, when a task is sending, the socket has no room or
        the stream is TLS (its own buffering)."""
        stream = self.stream
        if (
            self.dead
            or self._disconnecting
            or self.send_lock.locked()
            or not isinstance(stream, trio.SocketStream)
        ):
            return False
        cookie = self._next_cookie
        wire = self.tx.request(Cmd.READ, cookie, call.offset, len(call.buffer))
        try:
            sent = os.write(stream.socket.fileno(), wire)
        except BlockingIOError:
            self.tx.forget(cookie)
            return False
        except OSError as exc:
            self.kill(f"send failed: {exc!r}")
            return False
        if sent < len(wire):  # the rest would have to wait: the stream is cut mid-request
            self.kill("send buffer full in the middle of a request")
            return False
        self._next_cookie += 1
        call.cookie = cookie
        self.calls[cookie] = call
        return True

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
                    raise _ConnectionLost from exc
            if scope.cancelled_caught:
                self.kill("send timed out")
                raise _ConnectionLost

    async def disconnect(self) -> None:
        """Polite NBD_CMD_DISC (best effort, bounded), then the connection ends."""
        if self.dead:
            return
        self._disconnecting = True
        with trio.move_on_after(1.0):
            async with self.send_lock:
                with suppress(*STREAM_ERRORS, NBDError):
                    await self.stream.send_all(self.tx.request(Cmd.DISC, 0))
        self.kill("disconnected", expected=True)


class RemoteLink:
    """A self-healing connection to one origin. Use ``open_remote_link``."""

    def __init__(
        self,
        address: RemoteAddress,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        expected_size: int | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.size = expected_size if expected_size is not None else -1
        self.state = LinkState.CONNECTING
        self.last_error = ""
        self.requests = 0  # READ requests sent, for status and tests
        self.tx_flags = TxFlag(0)
        self.structured = False
        self.extended = False  # the origin took extended headers
        self.allocation = False  # the origin answers base:allocation block status
        self.status_requests = 0  # BLOCK_STATUS requests sent
        self.max_payload = 32 * 1024 * 1024
        self._conn: _Connection | None = None
        self._replacement: _Connection | None = None
        self._installed = trio.Event()  # set (and renewed) whenever a connection goes live
        self._scope: trio.CancelScope | None = None
        self._down_since = math.inf
        self._closing = False
        self._kick = trio.Event()  # a request wants a connection attempt now
        self._attempts_started = 0
        self._attempts_done = 0
        self._news = trio.Event()  # set (and renewed) when an attempt ends or the state changes

    @property
    def description(self) -> str:
        return self.address.describe()

    def status(self) -> dict[str, object]:
        return {
            "remote": self.description,
            "state": self.state.value,
            "last_error": self.last_error,
            "requests": self.requests,
            "extended_headers": self.extended,
            "allocation": self.allocation,
        }

    async def _negotiate(self, address: RemoteAddress) -> _Connection:
        stream, info, leftover = await open_connection(address, self.connect_timeout)
        if info.size == 0:
            await close_quietly(stream)
            raise OSError(errno.EINVAL, f"{address.describe()} exports size 0")
        if self.size >= 0 and info.size != self.size:
            await close_quietly(stream)
            raise SizeMismatchError(
                errno.EINVAL,
                f"{address.describe()} exports {info.size} bytes, expected {self.size}",
            )
        return _Connection(stream, info, leftover, self.timeout)

    def _install(self, conn: _Connection) -> None:
        self._conn = conn
        self.size = conn.info.size
        self.tx_flags = conn.info.tx_flags
        self.structured = conn.info.structured
        self.extended = conn.info.extended
        self.allocation = conn.info.allocation_id is not None
        self.max_payload = conn.info.max_payload
        was_down = self._down_since
        self.state = LinkState.CONNECTED
        self._down_since = math.inf
        self._installed.set()
        self._installed = trio.Event()
        self._tell()
        if was_down < math.inf:
            down_for = trio.current_time() - was_down
            log.warning("origin %s is back after %.1f s", self.description, down_for)
        else:
            headers = "extended" if self.extended else "compact"
            log.info(
                "connected to origin %s (%d bytes, %s headers)%s",
                self.description,
                self.size,
                headers,
                "" if self.allocation else "; it cannot tell its allocation: cache-all fetches all",
            )

    def _tell(self) -> None:
        """Wake every request waiting in ``_wait_connection``."""
        self._news.set()
        self._news = trio.Event()

    def _uninstall(self) -> None:
        self._conn = None
        if self.state is LinkState.CONNECTED:
            self.state = LinkState.RECONNECTING
            self._down_since = trio.current_time()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (the first failure is raised), report started, then keep the link up."""
        conn: _Connection | None = await self._negotiate(self.address)
        task_status.started()
        try:
            while not self._closing:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    if conn is None:
                        conn = await self._connect_with_backoff()
                    self._install(conn)
                    await conn.serve()
                self._uninstall()
                conn, self._replacement = self._replacement, None
        finally:
            self.state = LinkState.CLOSED
            self._uninstall()
            self._tell()  # wake waiters: they see CLOSED and fail

    async def _connect_with_backoff(self) -> _Connection:
        """Attempts with exponential backoff between them; a request's kick cuts the wait."""
        log.warning("origin %s is down; reconnecting", self.description)
        delay = self.backoff_initial
        first = True
        while True:
            self._kick = trio.Event()
            self._attempts_started += 1
            try:
                return await self._negotiate(self.address)
            except OSError as exc:
                self.last_error = str(exc)
                (log.warning if first else log.debug)(
                    "reconnecting to %s failed: %s", self.description, exc
                )
                first = False
            finally:
                self._attempts_done = self._attempts_started
                self._tell()
            if (
                self.state is not LinkState.FAILED
                and trio.current_time() - self._down_since > self.timeout
            ):
                self.state = LinkState.FAILED
                log.error(
                    "origin %s unavailable for more than %g s: uncached reads fail until it "
                    "is back (%s)",
                    self.description,
                    self.timeout,
                    self.last_error,
                )
            with trio.move_on_after(delay):
                await self._kick.wait()
            delay = min(delay * 2, self.backoff_max)

    async def reconnect(self, address: RemoteAddress) -> None:
        """Switch to another origin exporting the same size; requests in flight move over."""
        conn = await self._negotiate(address)
        if self._replacement is not None:  # a concurrent reconnect lost the race
            self._replacement.kill("superseded", expected=True)
        old = self.description
        self.address = address
        self._replacement = conn
        log.info("origin changed from %s to %s", old, self.description)
        installed = self._installed
        if self._scope is not None:
            self._scope.cancel()
        await installed.wait()

    async def _wait_connection(self) -> _Connection:
        """The live connection; when there is none, an attempt is asked for at once. While the
        link is FAILED, EIO as soon as an attempt that began after this call has failed."""
        wanted = 0
        while True:
            if self.state is LinkState.CLOSED:
                raise _eio("origin link closed")
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if self.state is LinkState.FAILED and wanted and self._attempts_done >= wanted:
                raise _eio(f"origin {self.description} unavailable: {self.last_error}")
            if not wanted:
                # the attempt under way may have begun before the origin came back; one kick
                # per request (not per pass), so a waiting request never spins attempts
                wanted = self._attempts_started + 1
                self._kick.set()
            await self._news.wait()

    def start_read(self, offset: int, length: int) -> StartedRead | None:
        """Send a READ now, from the event loop's thread without waiting, when a connection
        is up and free to send; None otherwise (use ``read``). ``finish_read`` waits for it."""
        conn = self._conn
        if conn is None or not 0 < length <= self.max_payload:
            return None
        call = _Call(offset, length)
        if not conn.send_read_now(call):
            return None
        self.requests += 1
        return StartedRead(conn, call, trio.current_time())

    async def finish_read(self, started: StartedRead) -> bytearray:
        """The data of a ``start_read``, as ``read`` would give it (the same ``timeout``
        counted from the start, asked again on a fresh connection if this one is lost)."""
        call = started.call
        return await self._read(call.offset, len(call.buffer), started)

    async def read(self, offset: int, length: int) -> bytearray:
        """Read from the origin; OSError(EIO) after ``timeout`` seconds without an answer, or
        the origin's own error for this request."""
        if length == 0:
            return bytearray()
        if length > self.max_payload:
            out = bytearray()
            for start in range(offset, offset + length, self.max_payload):
                part = min(self.max_payload, offset + length - start)
                out += await self.read(start, part)
            return out
        return await self._read(offset, length, None)

    async def _read(self, offset: int, length: int, started: StartedRead | None) -> bytearray:
        began = trio.current_time() if started is None else started.at
        conn: _Connection | None = None
        with trio.move_on_at(began + self.timeout):
            if started is not None:
                conn = started.conn
                try:
                    return (await conn.wait_for(started.call, Cmd.READ, length)).buffer
                except _ConnectionLost:
                    pass
            while True:
                conn = await self._wait_connection()
                try:
                    self.requests += 1
                    return await conn.read(offset, length)
                except _ConnectionLost:
                    continue
        self._drop_if_stuck(conn, began)
        raise _eio(f"origin {self.description}: no answer within {self.timeout}s")

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """The origin's base:allocation extents (length, flags) from ``offset``, covering at
        least one byte and at most ``length`` bytes (clipped here); None when the origin
        cannot tell (no structured replies or no base:allocation context). OSError(EIO) after
        ``timeout`` seconds, or the origin's own error."""
        length = min(length, self.max_status_length)
        started = trio.current_time()
        conn: _Connection | None = None
        with trio.move_on_after(self.timeout):
            while True:
                conn = await self._wait_connection()
                if conn.info.allocation_id is None:
                    return None
                try:
                    self.status_requests += 1
                    extents = await conn.block_status(offset, length)
                except _ConnectionLost:
                    continue
                return _clip(extents, length)
        self._drop_if_stuck(conn, started)
        raise _eio(f"origin {self.description}: no answer within {self.timeout}s")

    @property
    def max_status_length(self) -> int:
        """The longest range one BLOCK_STATUS asks about (compact lengths are 32-bit)."""
        return (1 << 40) if self.extended else 0xFFFFF000

    def _drop_if_stuck(self, conn: _Connection | None, started: float) -> None:
        # A connection on which nothing arrived since we asked is stuck: drop it, so the next
        # requests go to a fresh one.
        if conn is not None and conn is self._conn and conn.last_receive < started:
            conn.kill(f"no reply for {self.timeout}s")

    async def aclose(self) -> None:
        """Send DISC and stop; requests still waiting fail with EIO."""
        self._closing = True
        if self._conn is not None:
            await self._conn.disconnect()
        if self._scope is not None:
            self._scope.cancel()


def _clip(extents: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Extents with a length, at most ``length`` bytes in all (an origin may overshoot)."""
    out: list[tuple[int, int]] = []
    total = 0
    for ext_len, flags in extents:
        if ext_len <= 0:
            continue
        ext_len = min(ext_len, length - total)
        out.append((ext_len, flags))
        total += ext_len
        if total >= length:
            break
    if not out:
        raise _eio("origin answered BLOCK_STATUS without extents")
    return out


@asynccontextmanager
async def background_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks around a ``yield``: an exception from the body comes out
    as itself, on trio 0.22 and on newer trio (which wraps it in an ExceptionGroup)."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_remote_link(
    address: RemoteAddress,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the origin link's per-request timeout)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    backoff_max: float = 5.0,
    expected_size: int | None = None,
) -> AsyncIterator[RemoteLink]:
    """Connect to ``address`` (OSError if that fails) and keep the link up inside the block."""
    link = RemoteLink(
        address,
        timeout=timeout,
        connect_timeout=connect_timeout,
        backoff_max=backoff_max,
        expected_size=expected_size,
    )
    async with background_nursery() as nursery:
        await nursery.start(link.run)
        try:
            yield link
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await link.aclose()
            nursery.cancel_scope.cancel()
