"""Reading one connection's requests off its socket: the receive side of ``dataplane.DataPlane``.

Requests are read into a receive buffer of ``RECEIVE_SIZE`` bytes, whose unparsed bytes are
``rbuf[rstart:rend]``; a large WRITE payload that has not arrived whole gets a buffer of its own
that grows as its bytes come (``PAYLOAD_STEP``, doubling), and a refused payload is read and
dropped (``_discard``). A handover reads no further than the end of the request at hand. A
request is admitted (queue depth, bytes from the budget) before it is read any further, and a
stopping connection reads until its client closes (``_linger``). The plane parses and answers
(dataplane.py); this mixin moves bytes in, keeps the framing and admits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
from collections.abc import Callable

from .budget import ByteBudget, Grant, Limits
from .dispatch import Buffers, failed_reply
from .export import Export
from .outbox import ClosedConnection
from .payload_pipe import PayloadPipe, PipeFull
from .proto.consts import Cmd
from .proto.messages import Negotiated, Request
from .proto.transmission import DRAIN_LIMIT
from .tls import Transport

log = logging.getLogger("xnbdd")

RECEIVE_SIZE = 128 * 1024  # the socket is read into this; larger WRITE payloads get their own
PAYLOAD_STEP = 256 * 1024  # such a payload buffer starts this large and doubles as bytes arrive
AHEAD_MAX = 1024 * 1024  # bytes a busy connection keeps taken ahead of its requests (budget.py)

_WRITE = int(Cmd.WRITE)


class Receiver:
    """The state and the reads of the receive side; ``DataPlane`` sets it up and answers."""

    _fields: dict[str, str]
    _transport: Transport
    _export: Export
    _fd: int
    _wake_fd: int  # the eventfd that wakes the thread
    _aborted: bool
    _limits: Limits
    _budget: ByteBudget
    _blocked: Grant | None
    _line: dict[int, Callable[[], None]]  # connections waiting for bytes (budget.py)
    _key: int  # our place in that line
    _readv: Callable[[list[memoryview]], int]
    _unpack_head: Callable[[bytes | bytearray | memoryview, int], tuple[int, ...]]
    _head_size: int
    _payload_flag: int
    _max_payload: int
    _rbuf: bytearray
    _rview: memoryview
    _whole: list[memoryview]  # [_rview], for a read into the whole (empty) buffer
    _rstart: int
    _rend: int
    _payload: bytearray | PayloadPipe | None  # a large payload being received
    _pipe: PayloadPipe | None
    _pipe_max: int
    _payload_got: int
    _payload_head: tuple[int, int, int, int, int]  # its cmd, flags, cookie, offset, length
    _payload_charged: bool
    _discard: int  # bytes of a refused payload still to drop
    _spare: bytearray | None
    _drained: bool
    _end: str
    _handover: bool
    _readonly: bool
    _size: int
    _write_flags: int
    _negotiated: Negotiated
    _queue: Callable[[Buffers, int], None]
    _queue_ok: Callable[[int, int, int], None]
    _head_admitted: bool
    _head_cost: int
    in_flight: int
    _counted: int
    _held: int
    _ahead: int

    def _wake(self) -> None:
        raise NotImplementedError  # the plane wakes its thread

    def _handle_alone(
        self,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        data: bytearray | PayloadPipe,
        cost: int,
    ) -> None:
        raise NotImplementedError  # the plane answers

    # -- the end of a connection -------------------------------------------------------------

    def _linger(self) -> None:
        """Every reply is out: tell the client (end of stream) and read until it closes, so a
        request it sent meanwhile does not turn our close into a reset that could destroy
        replies it has not read yet. The grace period (``abort``) bounds the wait."""
        try:
            self._transport.close_notify()
            with socket.socket(fileno=os.dup(self._fd)) as sock:  # shuts the socket, not the fd
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        poller.register(self._fd, select.POLLIN)
        scratch = memoryview(bytearray(RECEIVE_SIZE))
        while not self._aborted:
            try:
                if not os.readv(self._fd, [scratch]):
                    return
            except BlockingIOError:
                poller.poll()
                self._take_wake()
            except OSError:
                return

    def _take_wake(self) -> None:
        """Reset the wake-up eventfd (it may not have fired)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    # -- admission: a request is admitted before it is read any further (budget.py) ---------

    def _admit(self, cost: int) -> bool:
        """Count one more request in flight and take its bytes, or say why not."""
        if self.in_flight >= self._limits.max_requests:
            self._blocked = Grant.OWN_SHARE
            return False
        if not self._charge(cost):
            return False
        self.in_flight += 1
        self._counted += 1
        return True

    def _charge(self, cost: int) -> bool:
        ahead = self._ahead
        if cost <= ahead:
            self._ahead = ahead - cost
            self._held += cost
            return True
        if ahead:  # too little for this one: back to the daemon, which decides afresh
            self._ahead = 0
            self._budget.give_back(ahead, 0)
        spare = AHEAD_MAX - cost if cost < AHEAD_MAX and not self._line else 0
        grant, extra = self._budget.take_ahead(cost, spare, self._held, self._key, self._wake)
        if grant is not Grant.TAKEN:
            self._blocked = grant
            return False
        self._held += cost
        self._ahead = extra
        return True

    def _settle(self) -> None:
        """Give back the bytes taken ahead, and tell the budget the requests in flight."""
        ahead, counted = self._ahead, self._counted
        self._ahead = self._counted = 0
        self._budget.give_back(ahead, -counted)  # admitted less answered: may add requests

    def _at_boundary(self) -> bool:
        """Every byte read belongs to a request taken out of the buffer."""
        return self._payload is None and not self._discard and self._rstart == self._rend

    def _to_boundary(self) -> int:
        """Bytes still to read before the request at the head of the buffer is whole (0: it is,
        or the buffer is empty). A handover reads exactly these, never into the next request."""
        if self._payload is not None:
            return self._payload_head[4] - self._payload_got
        if self._discard:
            return self._discard
        have, head = self._rend - self._rstart, self._head_size
        if not have:
            return 0
        if have < head:
            return head - have
        _magic, flags, cmd, _cookie, _offset, length = self._unpack_head(self._rbuf, self._rstart)
        carries = cmd == _WRITE or flags & self._payload_flag
        if carries and length <= self._max_payload:
            need: int = head + length - have
            return max(0, need)
        return 0

    def _read(self) -> bool:
        """Read what the socket holds; False when it holds nothing now (or it ended)."""
        if self._payload is not None:
            return self._read_payload()
        buf = self._rbuf
        if not self._rend and not self._handover and not self._discard:
            # the common case: the last pass took every byte; read into the whole buffer
            views, room = self._whole, len(buf)
        else:
            if self._rend == len(buf):
                if self._rstart == 0:  # a full buffer that parses to nothing cannot happen
                    raise ClosedConnection("receive buffer full without a complete request")
                live = self._rend - self._rstart
                buf[:live] = buf[self._rstart : self._rend]
                self._rstart, self._rend = 0, live
            view = self._rview[self._rend :]
            if self._handover:
                to_boundary = self._to_boundary()
                if not to_boundary:  # the request is whole: the rest is the next process's
                    return False
                view = view[:to_boundary]
            views, room = [view], len(view)
        try:  # ``_recv_views``, inline: once per batch
            count = self._readv(views)
        except BlockingIOError:
            self._drained = True
            return False
        except OSError as err:
            log.debug("client connection failed: %s", err, extra=self._fields)
            count = 0
        if not count:
            self._at_end()
            return False
        self._drained = count < room  # see ``_recv_views``
        if self._discard:
            dropped = min(self._discard, count)
            self._discard -= dropped
            buf[self._rend : self._rend + count - dropped] = buf[
                self._rend + dropped : self._rend + count
            ]
            count -= dropped
        self._rend += count
        return True

    def _read_payload(self) -> bool:
        payload = self._payload
        assert payload is not None
        length = self._payload_head[4]
        if isinstance(payload, PayloadPipe):
            count = self._splice(payload, length - self._payload_got)
        else:
            if self._payload_got == len(payload):  # allocate as the bytes arrive
                payload.extend(bytes(min(len(payload), length - len(payload))))
            count = self._recv(memoryview(payload)[self._payload_got :])
        if count is None:
            return False
        self._payload_got += count
        if self._payload_got == length:
            self._payload = None
            self._payload_charged = False
            cmd, flags, cookie, offset, _length = self._payload_head
            self._head_admitted = False
            self._handle_alone(cmd, flags, cookie, offset, length, payload, length)
        return True

    def _splice(self, pipe: PayloadPipe, count: int) -> int | None:
        """``_recv`` into the pipe; 0 when it spilled (nothing new was read)."""
        try:
            moved = pipe.fill(self._transport, count)
        except PipeFull:  # the network's pieces are smaller than the pipes' size supposes:
            # from now on only payloads up to what they held go through them
            self._pipe_max = min(self._pipe_max, pipe.held)
            self._payload = pipe.take()  # the rest comes into this buffer
            return 0
        except BlockingIOError:
            self._drained = True
            return None
        except OSError as err:
            log.debug("client connection failed: %s", err, extra=self._fields)
            moved = 0
        if not moved:
            self._at_end()
            return None
        self._drained = moved < count  # the socket is empty, or the pipe full: the next says
        return moved

    def _recv(self, view: memoryview) -> int | None:
        """Bytes read into ``view``; None when nothing is there now. End of stream (or an error
        reading) ends the requests, and once stopping an empty socket does too."""
        return self._recv_views([view], len(view))

    def _recv_views(self, views: list[memoryview], room: int) -> int | None:
        """``_recv`` into ``views``, ``room`` bytes in all."""
        try:
            count = self._readv(views)
        except BlockingIOError:
            self._drained = True
            return None
        except OSError as err:
            log.debug("client connection failed: %s", err, extra=self._fields)
            count = 0
        if not count:
            self._at_end()
            return None
        # A short read emptied the socket: the plane polls before it reads again, unless a
        # client that keeps its queue full has been sending more meanwhile (dataplane.py).
        self._drained = count < room
        return count

    def _at_end(self) -> None:
        """End of stream, or the socket failed: no more requests."""
        self._end = "end of stream"
        if self._payload is not None or self._rend > self._rstart:
            self._end = "end of stream inside a request"
        if self._head_admitted:  # a request cut short is never answered: let it go
            self._head_admitted = False
            self.in_flight -= 1
            self._counted -= 1
            self._held -= self._head_cost
            self._ahead += self._head_cost
            self._head_cost = 0

    def _start_payload(
        self, pos: int, cmd: int, flags: int, cookie: int, offset: int, length: int, have: int
    ) -> None:
        start = pos + self._head_size
        pipe = self._payload_pipe(length) if cmd == _WRITE and not self._readonly else None
        if pipe is not None:
            pipe.begin(bytes(self._rview[start : start + have]))
            self._payload = pipe
        else:
            spare, self._spare = self._spare, None
            if spare is not None and len(spare) == length:
                payload = spare  # sequential writers repeat sizes: no allocation, no page faults
            else:
                payload = bytearray(min(length, max(PAYLOAD_STEP, have)))
            memoryview(payload)[:have] = self._rview[start : start + have]  # one copy, not two
            self._payload = payload
        self._payload_got = have
        self._payload_head = (cmd, flags, cookie, offset, length)
        self._rstart = self._rend = 0

    def _write_piped(
        self, flags: int, cookie: int, offset: int, length: int, pipe: PayloadPipe, cost: int
    ) -> bool:
        """A WRITE whose payload is in the pipe, written from there if the backend can now
        (the gate is held); False: the pipe still holds it whole."""
        sink = self._export.pipe_sink  # (a read-only connection fills no pipe)
        if sink is None or flags & ~self._write_flags or offset + length > self._size:
            return False  # the buffer path answers it (FUA, past the end) or refuses it
        try:
            if not sink.try_write_piped(offset, length, pipe):
                return False
        except OSError as err:
            pipe.discard()
            req = Request(cookie, _WRITE, flags, offset, length)
            self._queue(failed_reply(req, self._negotiated, err, self._fields), cost)
            return True
        self._queue_ok(cookie, offset, cost)
        return True

    def _payload_pipe(self, length: int) -> PayloadPipe | None:
        """The connection's pipe, where a payload of ``length`` bytes can go through one (a
        plain socket, an export that takes piped payloads, a pipe to be had); else None."""
        if length > self._pipe_max or not self._export.pipe_sink:
            return None
        if self._pipe is None:
            try:
                self._pipe = PayloadPipe()
            except OSError as err:
                log.debug("large writes without a pipe: %s", err, extra=self._fields)
                self._pipe_max = 0
        return self._pipe

    def _oversized_payload(self, pos: int, length: int) -> None:
        """A refused payload (beyond the maximum, or while stopping): drop it to stay in step,
        or close when it is too large even to drop (denial of service)."""
        if length > DRAIN_LIMIT:
            log.warning(
                "closing connection: payload of %d bytes refused as denial of service",
                length,
                extra=self._fields,
            )
            raise ClosedConnection("framing lost")
        start = pos + self._head_size
        here = min(length, self._rend - start)
        self._rstart = start + here
        self._discard = length - here
