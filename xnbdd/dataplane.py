"""The transmission phase of one connection: a thread that owns the client socket.

After the handshake a connection's requests are read, parsed and answered by one OS thread in a
tight batch loop: read what the socket holds, take every complete request out of it, answer at
once whatever the backend can answer without waiting (``InlineIO``: the page cache, a memory file
system, blocks already cached), and send every reply of the batch with one ``writev``. What must
wait (a device, the origin server, a paused export, a FLUSH) goes to the event loop as a task, and
its reply comes back through ``complete``, which wakes the thread (no task or object per request).

Flow control never stops the connection, it only slows the client: the thread stops reading the
socket while the connection has ``--max-queue-size`` requests in flight or the daemon as a whole
holds ``--max-buf-size`` bytes (``budget.ByteBudget``), and goes on sending replies and taking
completions, which is what gives budget back. A request's cost is taken before its payload is
read, and a WRITE payload is allocated as its bytes arrive, so an announced length alone costs
nothing. Requests that have their reply sent give their cost back. Small requests draw on bytes
the thread took ahead from the budget (``ByteBudget.take_ahead``), which it gives back once it has
slept ``SETTLE_AFTER_MS`` (at once when a connection is in line), so a request costs no lock.

With extended headers (docs/data-path.md) requests are 32 bytes, and one with
NBD_CMD_FLAG_PAYLOAD_LEN carries a payload received like a WRITE's, whatever its command. The bytes
move through a ``tls.Transport`` (the socket or a TLS session); replies wait in an ``Outbox``.

On server shutdown every request still arriving gets ESHUTDOWN, running ones finish, and the
socket closes once the last reply is out (so at end of stream or NBD_CMD_DISC). A handover (a stop
with a file descriptor store, fdstore.py) reads no further than the end of the request in the
buffer, answers every request read, and returns ``HANDED_OVER`` with the socket open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable

from .backends.base import InlineIO, TryRead, TryWrite
from .budget import ByteBudget, Grant, Limits
from .dispatch import Buffers, error_reply, failed_reply
from .export import Export
from .outbox import ClosedConnection, Oks, Outbox, Reads
from .payload_pipe import MAX_PIPES, PIPE_SIZE, PayloadPipe
from .proto.consts import (
    EXTENDED_REQUEST_MAGIC,
    MAX_ACCEPTED_PAYLOAD,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .proto.errors import RequestError
from .proto.messages import Negotiated, Request
from .proto.transmission import check_request, offset_hole
from .proto.wire import (
    EXTENDED_REQUEST,
    REQUEST,
)
from .receive import AHEAD_MAX, RECEIVE_SIZE, Receiver
from .tls import Transport

log = logging.getLogger("xnbdd")

DIRECT_PAYLOAD = 64 * 1024  # a WRITE payload this large that has not arrived whole gets its own
SPARE_PAYLOAD_MAX = 2 * 1024 * 1024  # a finished payload buffer this small is kept for the next
HOLE_CHECK_MIN = 64 * 1024  # structured READs this large may be answered as one hole chunk
SETTLE_AFTER_MS = 5  # a connection asleep this long gives them back (at once if one is in line)
PEEK_BACKOFF_MAX = 6  # after reads of an emptied socket found nothing, poll first for up to 2**6

Submit = Callable[[Request, int], None]

_READ, _WRITE, _DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC)
_DONE, _OFFSET_DATA_TYPE = int(ReplyFlag.DONE), int(ReplyType.OFFSET_DATA)
_NONE_TYPE, _PAYLOAD_LEN = int(ReplyType.NONE), int(CmdFlag.PAYLOAD_LEN)
_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR  # a read would not block
_OWN_SHARE = Grant.OWN_SHARE  # a module constant: an enum member costs 90 ns to look up (3.11)
HANDED_OVER = "handed over at a request boundary"


class DataPlane(Receiver):
    """One connection's transmission phase. ``run`` is the thread; ``complete``,
    ``request_stop`` and ``abort`` may be called from the event loop."""

    # Slots: the thread reads and writes these for every request, and an instance with this
    # many attributes would otherwise keep them in a dictionary (slower to look up). Receiver
    # has no slots, so an attribute missing here still works, only slower.
    __slots__ = tuple(
        """
        _aborted _ahead _blocked _budget _completions _constants _counted _discard _drained _end
        _events _export _extended _fd _fields _finished _gate_held _handover _has_contexts
        _head_admitted _head_cost _head_size _held _inline _key _layered _limits _line _magic
        _max_payload _negotiated _no_peek _out _outbox _payload _payload_charged _payload_flag
        _payload_got _payload_head _peek_misses _pipe _pipe_max _queue _queue_ok _queue_oks
        _queue_read _queue_reads _rbuf _read_flags _readonly _readv _released _rend _rstart _rview
        _size _sleeping _spare _stopping _structured _submit _transport _try_read _try_write
        _unpack_head _wake_fd _wake_lock _whole _write_flags in_flight
        """.split()  # noqa: SIM905 (as a literal: 70 lines)
    )

    def __init__(
        self,
        transport: Transport,
        export: Export,
        negotiated: Negotiated,
        limits: Limits,
        budget: ByteBudget,
        submit: Submit,
        *,
        pending: bytes = b"",
        fields: dict[str, str] | None = None,
    ) -> None:
        self._transport = transport
        self._fd = transport.fd
        self._readv = transport.readv
        self._export = export
        self._negotiated = negotiated
        self._limits = limits
        self._budget = budget
        self._submit = submit
        tx = int(negotiated.tx_flags)
        self._structured = negotiated.structured
        self._extended = extended = negotiated.extended
        # the request layout, fixed for the connection
        layout = EXTENDED_REQUEST if extended else REQUEST
        self._unpack_head = layout.unpack_from
        self._head_size = layout.size
        self._magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        # with extended headers this flag means "a payload follows" on any command
        self._payload_flag = _PAYLOAD_LEN if extended else 0
        self._write_flags = self._payload_flag  # flags a WRITE may carry and be written inline
        self._fields = fields = fields or {}
        self._outbox = outbox = Outbox(transport, fields)
        self._out = outbox.parts  # empty when every reply is out
        self._layered = not transport.zero_copy  # TLS: the transport may hold bytes back
        self._queue = outbox.add
        self._queue_ok = outbox.add_none if extended else outbox.add_simple
        self._queue_oks = outbox.add_oks_extended if extended else outbox.add_oks_simple
        self._queue_reads = (
            outbox.add_reads_extended
            if extended
            else outbox.add_reads_chunk
            if negotiated.structured
            else outbox.add_reads_simple
        )
        self._queue_read = (
            outbox.add_read_extended
            if extended
            else outbox.add_read_chunk
            if negotiated.structured
            else outbox.add_read_simple
        )
        self._has_contexts = bool(negotiated.meta_contexts)
        self._readonly = bool(tx & TxFlag.READ_ONLY)
        fua = int(CmdFlag.FUA) if tx & TxFlag.SEND_FUA else 0
        # flags a READ may carry and still be answered inline (FUA means nothing for a READ)
        self._read_flags = fua | (int(CmdFlag.DF) if self._structured else 0)
        self._max_payload = MAX_ACCEPTED_PAYLOAD
        self._size = negotiated.export.size  # what this client was told
        # receive buffer: unparsed bytes are rbuf[rstart:rend]
        self._rbuf = bytearray(max(RECEIVE_SIZE, len(pending)))
        self._rbuf[: len(pending)] = pending
        self._rview = memoryview(self._rbuf)  # the buffer never changes size
        self._whole = [self._rview]
        self._rstart = 0
        self._rend = len(pending)
        self._head_admitted = False  # the header at rstart has its budget already
        self._head_cost = 0  # bytes it holds of the budget so far
        self._payload: bytearray | PayloadPipe | None = None  # a large payload being received
        self._pipe: PayloadPipe | None = None  # made at the first large WRITE (payload_pipe.py)
        self._pipe_max = MAX_PIPES * PIPE_SIZE if transport.zero_copy else 0  # see _splice
        self._payload_got = 0
        self._payload_head: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._discard = 0  # bytes of a refused payload still to drop
        self._spare: bytearray | None = None  # a payload buffer to reuse (dropped when idle)
        self.in_flight = 0  # admitted requests whose reply is not sent yet
        self._held = 0  # their cost in bytes
        self._ahead = 0  # bytes taken from the budget ahead of requests, held by none yet
        self._line = budget.line  # connections waiting for bytes: ours go back at once then
        self._key = id(self)  # our place in that line
        # the event loop's side
        self._completions: deque[tuple[Buffers, int]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._sleeping = False
        self._stopping = False
        self._handover = False
        self._aborted = False
        self._finished = False
        self._end = ""  # why no more requests are read ("" while reading)
        # why requests are not admitted now (None: they are); OWN_SHARE: until our replies
        # are sent (``_released``), QUEUED: until the budget wakes us
        self._blocked: Grant | None = None
        self._drained = False  # the last read emptied the socket
        self._no_peek = 0  # batches to go before reading an emptied socket without a poll
        self._peek_misses = 0  # such reads in a row that found nothing
        self._events = _POLLIN  # what the socket is registered for in the poller (0: not)
        self._released = False
        self._payload_charged = False  # the large WRITE at rstart has its bytes
        self._counted = 0  # requests admitted less those answered, not yet told to the budget
        # The export's pause gate, held across batches while the thread is busy: let go before
        # it sleeps, when the export is pausing (seen at the next batch) and when it ends.
        self._gate_held = False
        self._inline: InlineIO | None = None  # the export's inline I/O while the gate is held
        self._try_read: TryRead | None = None  # and its two methods, bound once
        self._try_write: TryWrite | None = None
        # what ``_parse`` needs, fixed for the connection (flags that keep a READ or WRITE
        # from being answered inline, inverted; the READ size from which holes are looked for)
        hole_check = HOLE_CHECK_MIN if self._structured else self._max_payload + 1
        # fmt: off
        self._constants = (
            self._rbuf, self._rview, self._unpack_head, self._head_size, self._magic,
            self._payload_flag, self._max_payload, self._size, ~self._read_flags,
            ~self._write_flags, not self._readonly, hole_check)
        # fmt: on

    # -- the event loop's side ------------------------------------------------------------------

    def complete(self, reply: Buffers, cost: int) -> None:
        """A request handed to the event loop is answered."""
        if self._finished:
            return  # the connection ended: nobody will send it (its budget is back already)
        self._completions.append((reply, cost))
        if self._sleeping:
            self._wake()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake()

    def request_handover(self) -> None:
        """Stop at the next request boundary once every request read is answered."""
        self._handover = True
        self._wake()

    def abort(self) -> None:
        self._aborted = True
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:  # never write to the fd number after ``run`` closed it
            if not self._finished:
                os.eventfd_write(self._wake_fd, 1)

    # -- the thread -----------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until the connection ends; returns why."""
        try:
            try:
                reason = self._loop()
            finally:
                self._let_go()  # before lingering: a pause never waits for the client
            if self._stopping and reason == "server shutting down":
                self._linger()
            else:
                self._transport.close_notify()  # TLS: the session's end, before the socket's
            return reason
        except ClosedConnection as why:
            return str(why)
        finally:
            with self._wake_lock:
                self._finished = True
                os.close(self._wake_fd)
            self._budget.forget(self._key)
            # replies never sent give their budget back here, and their bytes go with it (the
            # plane object may outlive the thread for a while); late completions are dropped
            self._outbox.clear()
            self._completions.clear()
            self._payload = self._spare = None
            if self._pipe is not None:
                self._pipe.close()
            self._budget.give_back(self._held + self._ahead, self.in_flight - self._counted)
            self._held = self.in_flight = self._ahead = self._counted = 0

    def _loop(self) -> str:
        poller = select.poll()
        poller.register(self._wake_fd, _POLLIN)
        poller.register(self._fd, _POLLIN)
        self._events = _POLLIN
        while True:
            if self._aborted:
                return "cut after the shutdown grace period"
            while self._completions:
                reply, cost = self._completions.popleft()
                self._queue(reply, cost)
            self._blocked = None
            self._released = False
            if not self._end:
                self._parse()
            if self._out:
                self._send()
            elif self._layered and self._outbox.holding():
                self._outbox.flush_transport()
            if self._end and not self.in_flight and not self._out and not self._holding():
                return self._end
            if self._blocked is _OWN_SHARE and self._released:
                continue  # the replies just sent made room
            want_read = not self._end and not self._blocked
            if self._handover and not self._end and not self._to_boundary():
                want_read = False  # the request at hand is whole: read nothing more
                if self._at_boundary() and not self.in_flight and not self._out:
                    return HANDED_OVER
            if want_read and not self._drained and self._read():
                continue
            if want_read and self._drained and self._stopping and not self.in_flight:
                # the socket holds nothing more and every request taken has its answer
                self._end = "server shutting down"
                continue
            if want_read and self._drained:
                # A client that keeps its queue full sent more while this batch was answered:
                # a read finds it at once, where a poll first would cost a system call per
                # batch. A read that finds nothing (an exception, dearer than the poll) makes
                # the next batches poll first, twice as many after each miss in a row.
                if self._no_peek:
                    self._no_peek -= 1
                elif self._read():
                    self._peek_misses = 0
                    continue
                else:
                    self._peek_misses = misses = min(self._peek_misses + 1, PEEK_BACKOFF_MAX)
                    self._no_peek = 1 << misses
            if self._wait(poller, want_read):
                self._read()  # at once: a pass over nothing new first would cost a batch's work

    def _holding(self) -> bool:
        return self._layered and self._outbox.holding()

    def _wait(self, poller: select.poll, want_read: bool) -> bool:
        """Sleep until the socket or a wake-up needs us; True: the socket has bytes to read
        (or its end) and reading was wanted."""
        if not self.in_flight:
            self._spare = None  # an idle connection holds no memory outside the budget
        timeout = None
        if self._ahead or self._counted:
            if self._line:
                self._settle()
            else:
                # The next request usually comes within microseconds (queue depth 1): keep
                # what was taken ahead, so that it needs no take and this no give-back, unless
                # the sleep goes on; then give it back (and the requests' count goes with it).
                timeout = SETTLE_AFTER_MS
        writing = self._out or (self._layered and self._outbox.holding())
        events = (_POLLIN if want_read else 0) | (_POLLOUT if writing else 0)
        if events != self._events:
            self._events = events
            if events:
                poller.register(self._fd, events)  # registers or modifies
            else:
                # Nothing to do with the socket (waiting for the event loop or for budget): a
                # closed peer's POLLHUP, reported whatever the events, would make this spin.
                with contextlib.suppress(KeyError):
                    poller.unregister(self._fd)
        if self._gate_held:
            self._let_go()  # a snapshot or switch never waits for a sleeping thread
        self._sleeping = True
        try:
            if self._completions:
                return False  # one came in before ``_sleeping`` was set: nobody will wake us
            ready = poller.poll(timeout)
        finally:
            self._sleeping = False
        if not ready:
            self._settle()  # the sleep went on: an idle connection holds nothing ahead
        if not want_read:
            self._drained = False  # the socket was not watched: what it holds is unknown
        readable = False
        for fd, revents in ready:
            if fd != self._fd:
                self._take_wake()
            elif revents & _READABLE:
                # otherwise ``_drained`` stays set (poll just said the socket is empty): a
                # wake-up for a completion costs no read that would find nothing
                self._drained = False
                readable = want_read
        return readable

    # -- parsing and answering ------------------------------------------------------------------

    def _parse(self) -> None:
        """Take every complete request out of the receive buffer that the budget admits."""
        if self._gate_held and self._export.pausing:
            self._let_go()  # a snapshot or switch waits for it: its requests go to the loop
        if self._payload is not None or self._discard:
            return  # the bytes that come next are a payload's, not a request's
        # what the common cases need (READ and WRITE the backend answers at once, without a
        # call to ``_handle``): one load per batch
        # fmt: off
        (buf, rview, unpack, head, magic_wanted, payload_flag, max_payload, size,
         read_flags, write_flags, writable, hole_check) = self._constants
        # fmt: on
        max_requests = self._limits.max_requests  # a reload may change it
        gate = self._gate_held  # inline answers pass the export's pause gate once
        inline, try_read, try_write = self._inline, self._try_read, self._try_write
        # their replies, queued in one go when the pass ends (outbox.py)
        reads: Reads = []
        oks: Oks = []
        reads_append, oks_append = reads.append, oks.append
        reads_cost = oks_cost = 0
        rend = self._rend  # only ``_read`` adds bytes (and ``_start_payload`` ends the pass)
        while True:
            pos = self._rstart
            if rend - pos < head:
                break
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if magic != magic_wanted:
                log.warning("closing connection: bad request magic %#x", magic, extra=self._fields)
                raise ClosedConnection("framing lost")
            if cmd == _DISC:
                self._rstart = pos + head
                self._end = "disconnect requested"
                break
            carries = cmd == _WRITE or flags & payload_flag  # a payload follows the header
            if self._stopping:
                if not self._refuse_while_stopping(pos, cmd, cookie, offset, length, carries):
                    break
                if self._discard:
                    break  # a payload to drop first
                continue
            payload_cmd = carries or cmd == _READ
            cost = length if payload_cmd and length <= max_payload else 0
            large_write = carries and cost >= DIRECT_PAYLOAD
            # Admitted, the request holds ``head_cost``; a break before it is taken out of the
            # buffer leaves it admitted (``_head_admitted``), as the next pass finds it.
            if self._head_admitted:  # admitted by an earlier pass: only ever the first one
                self._head_admitted = False
                head_cost = self._head_cost
            else:  # ``_admit``, inline: the common case takes no lock
                head_cost = 0 if large_write else cost
                if self.in_flight >= max_requests:
                    self._blocked = _OWN_SHARE
                    break
                if head_cost:
                    if head_cost <= self._ahead:
                        self._ahead -= head_cost
                        self._held += head_cost
                    elif not self._charge(head_cost):
                        break
                self.in_flight += 1
                self._counted += 1
            data: memoryview | None = None
            if carries:
                if length > max_payload:
                    self._oversized_payload(pos, length)
                    req = Request(cookie, cmd, 0, offset, length)
                    why = f"payload of {length} bytes exceeds maximum"
                    self._queue(error_reply(req, self._negotiated, Errno.EINVAL, why), cost)
                    if self._discard:
                        break  # the rest of the payload comes first
                    continue
                have = rend - pos - head
                if large_write and not self._payload_charged:
                    if not have or not self._charge(cost):
                        # a header alone costs nothing until its payload comes
                        self._head_admitted, self._head_cost = True, head_cost
                        break
                    self._payload_charged = True
                    head_cost = cost
                if have < length:
                    # small: the rest comes into the receive buffer
                    self._head_admitted, self._head_cost = True, head_cost
                    if large_write:
                        self._start_payload(pos, cmd, flags, cookie, offset, length, have)
                    break
                data = rview[pos + head : pos + head + length]
                self._rstart = pos + head + length
                if large_write:
                    self._payload_charged = False
            else:
                self._rstart = pos + head
            if not gate:
                gate = self._hold_gate()
                inline, try_read, try_write = self._inline, self._try_read, self._try_write
            # ``_handle``'s inline answers, for the two commands that are most of the
            # traffic; anything else (and whatever these decline) takes ``_handle``
            if try_read is not None and 0 < length <= max_payload and offset + length <= size:
                try:
                    if cmd == _READ:
                        if not flags & read_flags and length < hole_check:
                            got = try_read(offset, length)
                            if got is not None:
                                reads_append((cookie, offset, length, got))
                                reads_cost += cost
                            else:  # declined: the event loop's path, not a second try
                                self._handle(cmd, flags, cookie, offset, length, data, cost)
                            continue
                    elif cmd == _WRITE and not flags & write_flags and writable:
                        assert data is not None and try_write is not None
                        if try_write(offset, data):
                            oks_append((cookie, offset))
                            oks_cost += cost
                        else:
                            self._handle(cmd, flags, cookie, offset, length, data, cost)
                        continue
                except OSError as err:
                    req = Request(cookie, cmd, flags, offset, length)
                    self._queue(failed_reply(req, self._negotiated, err, self._fields), cost)
                    continue
            self._handle(cmd, flags, cookie, offset, length, data, cost, inline)
        if reads:
            self._queue_reads(reads, reads_cost)
        if oks:
            self._queue_oks(oks, oks_cost)
        if self._rstart == self._rend:
            self._rstart = self._rend = 0

    def _hold_gate(self) -> bool:
        """Pass the export's pause gate (False: it is paused) and keep holding it."""
        if self._export.try_admit():
            self._gate_held = True
            self._inline = inline = self._export.inline  # resolved again after a switch (a pause)
            if inline is not None:
                self._try_read, self._try_write = inline.try_read, inline.try_write
        return self._gate_held

    def _let_go(self) -> None:
        if self._gate_held:
            self._gate_held = False
            self._inline = self._try_read = self._try_write = None
            self._export.release()

    def _refuse_while_stopping(
        self, pos: int, cmd: int, cookie: int, offset: int, length: int, carries: int | bool
    ) -> bool:
        """ESHUTDOWN, at no cost in bytes: a payload is dropped, not received, so a stop never
        waits for budget. False: the queue depth is reached."""
        if self._head_admitted:
            cost, self._head_admitted, self._head_cost = self._head_cost, False, 0
        elif self._admit(0):
            cost = 0
        else:
            return False
        if carries:
            self._oversized_payload(pos, length)
        else:
            self._rstart = pos + self._head_size
        self._payload_charged = False
        self._queue_shutdown(Request(cookie, cmd, 0, offset, length), cost)
        return True

    def _queue_shutdown(self, req: Request, cost: int) -> None:
        message = "server shutting down"
        self._queue(error_reply(req, self._negotiated, Errno.ESHUTDOWN, message), cost)

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
        """``_handle`` outside a batch (a large payload that finished arriving): it passes the
        export's gate by itself."""
        if self._stopping:  # (a payload left in the pipes is dropped by the next ``begin``)
            self._queue_shutdown(Request(cookie, cmd, flags, offset, length), cost)
            return
        if self._gate_held and self._export.pausing:
            self._let_go()
        inline = self._inline if self._gate_held or self._hold_gate() else None
        if isinstance(data, PayloadPipe):  # declined: the buffer path, as without a pipe
            if inline is not None and self._write_piped(flags, cookie, offset, length, data, cost):
                return
            data = data.take()
        self._handle(cmd, flags, cookie, offset, length, data, cost, inline)

    def _handle(
        self,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        data: memoryview | bytearray | None,
        cost: int,
        inline: InlineIO | None = None,
    ) -> None:
        """Answer one request: inline when the backend can without waiting, else as a task of
        the event loop. ``inline``: the export's, once its gate admitted the batch (None: the
        export is paused, or has none)."""
        if self._stopping:  # a payload that finished arriving after the stop
            self._queue_shutdown(Request(cookie, cmd, flags, offset, length), cost)
            return
        if (
            inline is not None
            and length
            and offset + length <= self._size
            and length <= self._max_payload
        ):
            try:
                if cmd == _READ and not flags & ~self._read_flags:
                    if (
                        self._structured
                        and length >= HOLE_CHECK_MIN
                        and inline.is_hole(offset, length)
                    ):
                        extended = self._extended
                        hole = offset_hole(cookie, offset, length, done=True, extended=extended)
                        self._queue([hole], cost)
                        return
                    got = inline.try_read(offset, length)
                    if got is not None:
                        self._queue_read(cookie, offset, length, got, cost)
                        return
                elif cmd == _WRITE and not flags & ~self._write_flags and not self._readonly:
                    assert data is not None
                    if inline.try_write(offset, data):
                        self._queue_ok(cookie, offset, cost)
                        if isinstance(data, bytearray) and len(data) <= SPARE_PAYLOAD_MAX:
                            self._spare = data  # written and done with
                        return
            except OSError as err:
                req = Request(cookie, cmd, flags, offset, length)
                self._queue(failed_reply(req, self._negotiated, err, self._fields), cost)
                return
        payload = bytes(data) if isinstance(data, memoryview) else data
        req = Request(cookie, cmd, flags, offset, length, payload)
        try:
            req = check_request(
                req,
                size=self._size,
                tx_flags=self._negotiated.tx_flags,
                structured=self._structured,
                has_contexts=self._has_contexts,
                max_payload=self._max_payload,
                extended=self._extended,
                context_ids=self._negotiated.meta_contexts,
            )
        except RequestError as err:
            self._queue(error_reply(req, self._negotiated, err.errno, err.message), cost)
            return
        self._submit(req, cost)

    def _send(self) -> None:
        """Send what the socket takes now; give back the budget of every reply sent whole."""
        count, cost = self._outbox.send()
        if count:
            self._released = True
            self.in_flight -= count
            self._held -= cost
            self._counted -= count
            self._ahead += cost  # the next requests draw on it
            if self._ahead > AHEAD_MAX or self._line:  # not more, and none while others wait
                self._settle()
