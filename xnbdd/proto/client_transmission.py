"""The client side of NBD's transmission phase (doc/proto.md "Transmission"), sans-IO.

Bytes in, events out, as ``client.ClientHandshake``: the caller sends what ``request`` returns and
feeds whatever arrived to ``receive_data``.

``ClientTransmission`` encodes compact or extended (32-byte) requests and decodes simple,
structured and extended replies. It refuses to send what the server did not advertise (command
flags, TRIM, WRITE_ZEROES, CACHE, FLUSH): an xnbd-server drops the connection on any of those.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from .client import ClientUsageError
from .consts import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .errors import ProtocolError
from .wire import (
    BLOCK_STATUS_EXT_HEAD,
    CHUNK,
    ERROR_HEAD,
    EXTENDED_CHUNK,
    EXTENDED_REQUEST,
    EXTENT,
    EXTENT_EXT,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
    U32,
    U64,
)

_U32_MAX = 0xFFFFFFFF
_NO_FLAGS = CmdFlag(0)


@dataclass(frozen=True)
class ReadData:
    """``data`` belongs at export ``offset`` (part of the READ reply for ``cookie``)."""

    cookie: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class ReadHole:
    """``length`` bytes at ``offset`` read as zeros."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True)
class BlockStatus:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, flags)


@dataclass(frozen=True)
class ReplyError:
    """An error chunk; ``offset`` is set for NBD_REPLY_TYPE_ERROR_OFFSET."""

    cookie: int
    error: int
    message: str
    offset: int | None = None


@dataclass(frozen=True)
class ReplyDone:
    """The reply for ``cookie`` is complete; ``error`` is 0 on success (the first error seen)."""

    cookie: int
    error: int


ReplyEvent = ReadData | ReadHole | BlockStatus | ReplyError | ReplyDone


@dataclass
class _Outstanding:
    command: Cmd
    offset: int
    length: int
    error: int = 0
    received: int = 0  # READ bytes covered so far by data/hole chunks


_REQUIRED_FLAG = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
}


@dataclass
class ClientTransmission:
    """Encodes requests and decodes replies of one connection in transmission phase."""

    tx_flags: TxFlag
    structured: bool = False
    max_payload: int = MAX_PAYLOAD
    extended: bool = False  # 32-byte requests and replies; implies structured
    _outstanding: dict[int, _Outstanding] = field(default_factory=dict)
    _buffer: bytearray = field(default_factory=bytearray)
    _events: list[ReplyEvent] = field(default_factory=list)
    _closed: bool = False

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def request(
        self,
        command: Cmd,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: CmdFlag = _NO_FLAGS,
        payload: bytes | bytearray | memoryview | None = None,
        context_ids: Sequence[int] | None = None,
    ) -> bytes:
        """Encode one request (with its WRITE payload) and remember it for reply decoding.

        ``context_ids``: a BLOCK_STATUS answered only for these contexts (extended headers and
        NBD_FLAG_BLOCK_STATUS_PAYLOAD). NBD_CMD_FLAG_PAYLOAD_LEN is set here, never by callers.
        """
        if self._closed:
            raise ClientUsageError("connection already disconnected")
        needed = _REQUIRED_FLAG.get(command)
        if needed is not None and not self.tx_flags & needed:
            raise ClientUsageError(f"server did not advertise {needed.name} for {command.name}")
        if command is Cmd.BLOCK_STATUS and not self.structured:
            raise ClientUsageError("BLOCK_STATUS needs structured replies")
        if flags & CmdFlag.PAYLOAD_LEN:
            raise ClientUsageError("NBD_CMD_FLAG_PAYLOAD_LEN is set by the encoder")
        if flags:
            if not self.tx_flags & TxFlag.HAS_FLAGS:
                raise ClientUsageError("server does not accept command flags")
            if flags & CmdFlag.FUA and not self.tx_flags & TxFlag.SEND_FUA:
                raise ClientUsageError("server did not advertise SEND_FUA")
            if flags & CmdFlag.DF and not (self.structured and self.tx_flags & TxFlag.SEND_DF):
                raise ClientUsageError("server did not advertise SEND_DF")
            if flags & CmdFlag.FAST_ZERO and not self.tx_flags & TxFlag.SEND_FAST_ZERO:
                raise ClientUsageError("server did not advertise SEND_FAST_ZERO")
        if command is Cmd.WRITE:
            if payload is None or len(payload) != length:
                raise ClientUsageError("WRITE needs a payload of exactly `length` bytes")
        elif payload is not None:
            raise ClientUsageError(f"{command.name} takes no payload")
        if command in (Cmd.READ, Cmd.WRITE) and length > self.max_payload:
            raise ClientUsageError(f"{length} bytes exceed the server's maximum payload")
        if not self.extended and length > _U32_MAX:
            raise ClientUsageError("lengths above 32 bits need extended headers")
        wire_length = length
        if context_ids is not None:
            if command is not Cmd.BLOCK_STATUS:
                raise ClientUsageError("only BLOCK_STATUS takes context ids")
            if not (self.extended and self.tx_flags & TxFlag.BLOCK_STATUS_PAYLOAD):
                raise ClientUsageError("server did not advertise BLOCK_STATUS_PAYLOAD")
            payload = U64.pack(length) + struct.pack(f"!{len(context_ids)}I", *context_ids)
            wire_length = len(payload)
        if self.extended and payload is not None:
            flags |= CmdFlag.PAYLOAD_LEN
        if command is Cmd.DISC:
            self._closed = True
        elif cookie in self._outstanding:
            raise ClientUsageError(f"cookie {cookie:#x} is already in flight")
        else:
            self._outstanding[cookie] = _Outstanding(command, offset, length)
        if self.extended:
            header = EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, wire_length
            )
        else:
            header = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        return header + bytes(payload) if payload is not None else header

    def forget(self, cookie: int) -> None:
        """A request encoded by ``request`` but never sent: expect no reply for it."""
        del self._outstanding[cookie]

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ReplyEvent]:
        """Feed received bytes; returns the events they complete (possibly none)."""
        if not data:
            if self._outstanding:
                raise ProtocolError(f"server closed with {len(self._outstanding)} requests open")
            return []
        self._buffer += data
        while self._step():
            pass
        events, self._events = self._events, []
        return events

    def _step(self) -> bool:
        buf = self._buffer
        if len(buf) < 4:
            return False
        (magic,) = U32.unpack_from(buf)
        if self.extended:
            if magic != EXTENDED_REPLY_MAGIC:
                raise ProtocolError(f"reply magic {magic:#x} with extended headers")
            return self._chunk()
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise ProtocolError("structured reply chunk without negotiation")
            return self._chunk()
        raise ProtocolError(f"bad reply magic {magic:#x}")

    def _lookup(self, cookie: int) -> _Outstanding:
        request = self._outstanding.get(cookie)
        if request is None:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        return request

    def _simple(self) -> bool:
        buf = self._buffer
        if len(buf) < SIMPLE_REPLY.size:
            return False
        _magic, error, cookie = SIMPLE_REPLY.unpack_from(buf)
        request = self._lookup(cookie)
        # spec MUST: with structured replies negotiated a READ never gets a simple reply;
        # tolerate it only for an error, where no data follows and framing is intact.
        if request.command is Cmd.READ and self.structured and error == 0:
            raise ProtocolError("simple reply to READ after structured replies")
        data_length = request.length if request.command is Cmd.READ and error == 0 else 0
        total = SIMPLE_REPLY.size + data_length
        if len(buf) < total:
            return False
        if data_length:
            self._events.append(
                ReadData(cookie, request.offset, bytes(buf[SIMPLE_REPLY.size : total]))
            )
        del buf[:total]
        del self._outstanding[cookie]
        self._events.append(ReplyDone(cookie, error))
        return True

    def _chunk(self) -> bool:
        buf = self._buffer
        layout = EXTENDED_CHUNK if self.extended else CHUNK
        if len(buf) < layout.size:
            return False
        if self.extended:
            _magic, flags, kind, cookie, offset, length = EXTENDED_CHUNK.unpack_from(buf)
        else:
            _magic, flags, kind, cookie, length = CHUNK.unpack_from(buf)
        request = self._lookup(cookie)
        if self.extended and offset != request.offset:
            raise ProtocolError(f"reply offset {offset} for a request at {request.offset}")
        limit = self.max_payload + 64 if request.command is Cmd.READ else MAX_PAYLOAD
        if length > limit:
            raise ProtocolError(f"structured chunk of {length} bytes")
        total = layout.size + length
        if len(buf) < total:
            return False
        payload = bytes(buf[layout.size : total])
        del buf[:total]
        self._decode_chunk(cookie, request, kind, payload)
        if flags & ReplyFlag.DONE:
            incomplete = request.received != request.length
            if request.command is Cmd.READ and not request.error and incomplete:
                raise ProtocolError(
                    f"READ reply covers {request.received} of {request.length} bytes"
                )
            del self._outstanding[cookie]
            self._events.append(ReplyDone(cookie, request.error))
        elif kind == ReplyType.NONE:
            raise ProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag")
        return True

    def _decode_chunk(self, cookie: int, request: _Outstanding, kind: int, payload: bytes) -> None:
        if kind == ReplyType.NONE:
            if payload:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
        elif kind == ReplyType.OFFSET_DATA:
            if request.command is not Cmd.READ or len(payload) < U64.size + 1:
                raise ProtocolError("bad OFFSET_DATA chunk")
            (offset,) = U64.unpack_from(payload)
            data = payload[U64.size :]
            self._check_range(request, offset, len(data))
            self._events.append(ReadData(cookie, offset, data))
        elif kind == ReplyType.OFFSET_HOLE:
            if request.command is not Cmd.READ or len(payload) != OFFSET_HOLE.size:
                raise ProtocolError("bad OFFSET_HOLE chunk")
            offset, length = OFFSET_HOLE.unpack(payload)
            if length == 0:
                raise ProtocolError("OFFSET_HOLE of length 0")
            self._check_range(request, offset, length)
            self._events.append(ReadHole(cookie, offset, length))
        elif kind == ReplyType.BLOCK_STATUS and not self.extended:
            if (
                request.command is not Cmd.BLOCK_STATUS
                or (len(payload) - 4) % 8
                or len(payload) < 12
            ):
                raise ProtocolError("bad BLOCK_STATUS chunk")
            (context,) = U32.unpack_from(payload)
            extents = tuple(EXTENT.iter_unpack(payload[4:]))
            self._events.append(BlockStatus(cookie, context, extents))
        elif kind == ReplyType.BLOCK_STATUS_EXT and self.extended:
            head = BLOCK_STATUS_EXT_HEAD.size
            if request.command is not Cmd.BLOCK_STATUS or len(payload) < head:
                raise ProtocolError("bad BLOCK_STATUS_EXT chunk")
            context, count = BLOCK_STATUS_EXT_HEAD.unpack_from(payload)
            if not count or len(payload) != head + count * EXTENT_EXT.size:
                raise ProtocolError("BLOCK_STATUS_EXT count does not match its length")
            extents = tuple(EXTENT_EXT.iter_unpack(payload[head:]))
            self._events.append(BlockStatus(cookie, context, extents))
        elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            self._error_chunk(cookie, request, kind, payload)
        elif kind & 0x8000:
            # unknown error types: the spec says to treat them as an error with their errno
            error = U32.unpack_from(payload)[0] if len(payload) >= 4 else Errno.EINVAL
            self._record_error(cookie, request, error or Errno.EINVAL, "", None)
        else:
            raise ProtocolError(f"unknown structured chunk type {kind}")

    def _error_chunk(self, cookie: int, request: _Outstanding, kind: int, payload: bytes) -> None:
        if len(payload) < ERROR_HEAD.size:
            raise ProtocolError("error chunk too short")
        error, message_length = ERROR_HEAD.unpack_from(payload)
        end = ERROR_HEAD.size + message_length
        extra = U64.size if kind == ReplyType.ERROR_OFFSET else 0
        if len(payload) != end + extra:
            raise ProtocolError("error chunk length does not match its message")
        if error == 0:
            raise ProtocolError("error chunk with error 0")
        message = payload[ERROR_HEAD.size : end].decode(errors="replace")
        offset = U64.unpack_from(payload, end)[0] if extra else None
        self._record_error(cookie, request, error, message, offset)

    def _record_error(
        self, cookie: int, request: _Outstanding, error: int, message: str, offset: int | None
    ) -> None:
        if not request.error:
            request.error = error
        self._events.append(ReplyError(cookie, error, message, offset))

    @staticmethod
    def _check_range(request: _Outstanding, offset: int, length: int) -> None:
        if offset < request.offset or offset + length > request.offset + request.length:
            raise ProtocolError("read chunk outside the requested range")
        request.received += length
        if request.received > request.length:
            raise ProtocolError("read chunks overlap")
