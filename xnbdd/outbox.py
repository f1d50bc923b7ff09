"""The replies of one connection on their way out: queued in order, sent in batches.

The data plane (dataplane.py) answers a whole batch of requests and then sends every reply with
as few system calls as the parts allow: one ``writev`` for up to ``MAX_IOV`` byte parts, one
``sendfile`` for a READ answered straight from a file (``FileRange``). A reply's cost (the bytes
it holds of the connection's budget) comes back only once its last byte is out, so ``send``
reports how many replies went whole and what they cost, and the plane gives that back.

The bytes move through a ``tls.Transport``: the socket itself (writev, sendfile), or the
connection's TLS session encrypting in the plane's thread (docs/tls.md); only a TLS transport can
hold bytes back (``has_output``), and only it is asked.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping

from .backends.base import FileRange
from .dispatch import Buffers
from .proto.consts import (
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)
from .proto.wire import EXTENDED_CHUNK, EXTENDED_OFFSET_DATA, OFFSET_DATA, SIMPLE_REPLY
from .tls import Transport

log = logging.getLogger("xnbdd")

MAX_IOV = 512  # buffers per writev, below the kernel's IOV_MAX of 1024

Part = bytes | bytearray | memoryview | FileRange
Data = bytes | bytearray | FileRange  # what a READ answered inline sends
Reads = list[tuple[int, int, int, Data]]  # READs a pass answered: cookie, offset, length, data
Oks = list[tuple[int, int]]  # requests a pass answered without data: cookie, offset

_CHUNK_HEAD = OFFSET_DATA.size

_DONE, _NONE_TYPE, _DATA = int(ReplyFlag.DONE), int(ReplyType.NONE), int(ReplyType.OFFSET_DATA)


class ClosedConnection(Exception):
    """The client is gone or broke framing: the plane ends without answering more."""


class Outbox:
    """Replies waiting for the socket. ``parts`` is empty when every reply is out."""

    def __init__(self, transport: Transport, fields: Mapping[str, str]) -> None:
        self._transport = transport
        self._writev = transport.writev
        self._sendfile = transport.sendfile
        self._layered = not transport.zero_copy  # may hold bytes back: ask ``has_output``
        self._fields = fields
        self.parts: deque[Part] = deque()
        # (stream position where replies end, how many, their cost): a mark per batch of
        # replies the plane queued at once, so a reply costs no mark of its own
        self._marks: deque[tuple[int, int, int]] = deque()
        self._cost = 0  # of the replies in ``_marks``
        self._open = 0  # replies queued since the last mark (the open batch)
        self._open_cost = 0
        self._queued = 0
        self._sent = 0
        self._ranges = 0  # FileRange parts in ``parts`` (sent with sendfile, not writev)

    def add(self, reply: Buffers, cost: int) -> None:
        if self._open:
            self._seal()
        for part in reply:
            size = part.length if isinstance(part, FileRange) else len(part)
            if size:
                self.parts.append(part)
                self._queued += size
                self._ranges += isinstance(part, FileRange)
        self._marks.append((self._queued, 1, cost))
        self._cost += cost

    def add_data(self, head: bytes, data: Data, cost: int) -> None:
        """A READ's reply: its header and the data (``length`` bytes) after it."""
        parts = self.parts
        parts.append(head)
        parts.append(data)
        if isinstance(data, FileRange):
            self._ranges += 1
            self._queued += len(head) + data.length
        else:
            self._queued += len(head) + len(data)
        self._open += 1
        self._open_cost += cost

    # A READ answered whole (``data`` is ``length`` bytes): one of these three per connection, as
    # its replies are laid out; each does ``add_data``'s work itself (one call per READ).

    def add_read_simple(self, cookie: int, offset: int, length: int, data: Data, cost: int) -> None:
        self._add_read(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data, length, cost)

    def add_read_chunk(self, cookie: int, offset: int, length: int, data: Data, cost: int) -> None:
        """One OFFSET_DATA chunk, flagged DONE (structured replies)."""
        parts = self.parts
        parts.append(
            OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, _DONE, _DATA, cookie, 8 + length, offset)
        )
        parts.append(data)
        self._ranges += isinstance(data, FileRange)
        self._queued += _CHUNK_HEAD + length
        self._open += 1
        self._open_cost += cost

    def add_read_extended(
        self, cookie: int, offset: int, length: int, data: Data, cost: int
    ) -> None:
        head = EXTENDED_OFFSET_DATA.pack(
            EXTENDED_REPLY_MAGIC, _DONE, _DATA, cookie, offset, 8 + length, offset
        )
        self._add_read(head, data, length, cost)

    def _add_read(self, head: bytes, data: Data, length: int, cost: int) -> None:
        parts = self.parts
        parts.append(head)
        parts.append(data)
        self._ranges += isinstance(data, FileRange)
        self._queued += len(head) + length
        self._open += 1
        self._open_cost += cost

    def add_simple(self, cookie: int, _offset: int, cost: int) -> None:
        self.parts.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
        self._queued += SIMPLE_REPLY.size
        self._open += 1
        self._open_cost += cost

    def add_none(self, cookie: int, offset: int, cost: int) -> None:
        """Success without data, with extended headers (which allow no simple reply)."""
        self.parts.append(
            EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, _DONE, _NONE_TYPE, cookie, offset, 0)
        )
        self._queued += EXTENDED_CHUNK.size
        self._open += 1
        self._open_cost += cost

    # A pass's inline answers in one go (the plane collects them, one tuple each, and queues
    # them when the pass ends): one call per batch instead of one per reply. One of these per
    # connection, as its replies are laid out, like the ones above.

    def add_reads_simple(self, reads: Reads, cost: int) -> None:
        append, pack = self.parts.append, SIMPLE_REPLY.pack
        size = ranges = 0
        for cookie, _offset, length, data in reads:
            append(pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            append(data)
            size += length
            ranges += isinstance(data, FileRange)
        self._added(len(reads), SIMPLE_REPLY.size, size, ranges, cost)

    def add_reads_chunk(self, reads: Reads, cost: int) -> None:
        append, pack = self.parts.append, OFFSET_DATA.pack
        size = ranges = 0
        for cookie, offset, length, data in reads:
            append(pack(STRUCTURED_REPLY_MAGIC, _DONE, _DATA, cookie, 8 + length, offset))
            append(data)
            size += length
            ranges += isinstance(data, FileRange)
        self._added(len(reads), _CHUNK_HEAD, size, ranges, cost)

    def add_reads_extended(self, reads: Reads, cost: int) -> None:
        append, pack = self.parts.append, EXTENDED_OFFSET_DATA.pack
        size = ranges = 0
        for cookie, offset, length, data in reads:
            append(pack(EXTENDED_REPLY_MAGIC, _DONE, _DATA, cookie, offset, 8 + length, offset))
            append(data)
            size += length
            ranges += isinstance(data, FileRange)
        self._added(len(reads), EXTENDED_OFFSET_DATA.size, size, ranges, cost)

    def add_oks_simple(self, oks: Oks, cost: int) -> None:
        """Simple replies without error: packed into one part."""
        pack = SIMPLE_REPLY.pack
        self.parts.append(b"".join([pack(SIMPLE_REPLY_MAGIC, 0, cookie) for cookie, _ in oks]))
        self._added(len(oks), SIMPLE_REPLY.size, 0, 0, cost)

    def add_oks_extended(self, oks: Oks, cost: int) -> None:
        pack = EXTENDED_CHUNK.pack
        self.parts.append(
            b"".join(
                [pack(EXTENDED_REPLY_MAGIC, _DONE, _NONE_TYPE, cookie, at, 0) for cookie, at in oks]
            )
        )
        self._added(len(oks), EXTENDED_CHUNK.size, 0, 0, cost)

    def _added(self, count: int, head: int, size: int, ranges: int, cost: int) -> None:
        """``count`` replies, each with a header of ``head`` bytes, ``size`` bytes of data in
        all (``ranges`` of them file ranges), joined the open batch."""
        self._queued += count * head + size
        self._ranges += ranges
        self._open += count
        self._open_cost += cost

    def _seal(self) -> None:
        """End the open batch: one mark for its replies."""
        self._marks.append((self._queued, self._open, self._open_cost))
        self._cost += self._open_cost
        self._open = self._open_cost = 0

    def clear(self) -> None:
        """The connection ended: drop what was never sent (and the bytes it holds)."""
        self.parts.clear()
        self._marks.clear()
        self._cost = self._open = self._open_cost = 0

    def holding(self) -> bool:
        """The transport holds bytes the socket has not taken yet (TLS only)."""
        return self._layered and self._transport.has_output()

    def flush_transport(self) -> None:
        try:
            self._transport.flush()
        except OSError as err:
            log.debug("client connection failed: %s", err, extra=self._fields)
            raise ClosedConnection("client gone while sending") from None

    def send(self) -> tuple[int, int]:
        """Send what the socket takes now; returns how many replies went out whole and their
        cost."""
        out = self.parts
        writev = self._writev
        try:
            while out:
                head = out[0]
                if isinstance(head, FileRange):
                    sent = self._sendfile(head.fd, head.offset, head.length)
                    if not sent:  # the image shrank under us; the header is already out
                        log.warning(
                            "closing connection: the image ended during a READ reply",
                            extra=self._fields,
                        )
                        raise ClosedConnection("image ended during a reply")
                    if sent < head.length:
                        out[0] = FileRange(head.fd, head.offset + sent, head.length - sent)
                    else:
                        out.popleft()
                        self._ranges -= 1
                    self._sent += sent
                    continue
                if not self._ranges and len(out) <= MAX_IOV:
                    # the common case: everything queued goes in one writev
                    sent = writev(out)  # type: ignore[arg-type]  # no FileRange in it
                    self._sent += sent
                    if self._sent == self._queued:  # every reply went whole
                        out.clear()
                        # the open batch needs no mark of its own: it went whole too
                        count, cost = self._open, self._cost + self._open_cost
                        marks = self._marks
                        if marks:
                            count += marks[0][1] if len(marks) == 1 else sum(m[1] for m in marks)
                            marks.clear()
                        self._cost = self._open = self._open_cost = 0
                        return count, cost
                    self._advance(sent, len(out))
                    break  # the socket took part of the batch: it is full
                views: list[bytes | bytearray | memoryview] = []
                for part in out:
                    if isinstance(part, FileRange) or len(views) == MAX_IOV:
                        break
                    views.append(part)
                sent = writev(views)
                self._sent += sent
                if not self._advance(sent, len(views)):
                    break  # the socket took part of the batch: it is full
        except BlockingIOError:
            pass
        except OSError as err:
            log.debug("client connection failed: %s", err, extra=self._fields)
            raise ClosedConnection("client gone while sending") from None
        if self._open:
            self._seal()  # before counting what went whole: the marks cover every reply
        return self._sent_whole()

    def _advance(self, sent: int, count: int) -> bool:
        """Drop what ``sent`` bytes covered of the first ``count`` parts (all bytes-like);
        True when they all went."""
        out = self.parts
        for _ in range(count):
            part = out[0]
            assert not isinstance(part, FileRange)
            size = len(part)
            if sent < size:
                out[0] = memoryview(part)[sent:]
                return False
            out.popleft()
            sent -= size
        return True

    def _sent_whole(self) -> tuple[int, int]:
        marks = self._marks
        sent = self._sent
        cost = count = 0
        while marks and marks[0][0] <= sent:
            _end, replies, their_cost = marks.popleft()
            cost += their_cost
            count += replies
        self._cost -= cost
        return count, cost
