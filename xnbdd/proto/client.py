"""The client side of NBD (doc/proto.md "Handshake" and "Transmission"), sans-IO.

Used by the proxy's link to its origin server and by tests. Bytes in, events out: the caller feeds
whatever arrived with ``receive_data`` and sends whatever ``data_to_send`` returns; nothing here
touches a socket.

``ClientHandshake`` detects the server's style from its greeting:
- oldstyle (xnbd-server): size, flags and 124 zeros arrive unasked; nothing is sent.
- newstyle without FIXED_NEWSTYLE (xnbd-wrapper): client flags 0, NBD_OPT_EXPORT_NAME only, then
  size, 16-bit flags and 124 zeros (NO_ZEROES is never asked of such a server).
- fixed newstyle: NBD_OPT_EXTENDED_HEADERS (they imply structured replies); if refused,
  NBD_OPT_STRUCTURED_REPLY (its refusal is fine too); with structured replies and
  ``allocation``, NBD_OPT_SET_META_CONTEXT for ``base:allocation`` (a refusal or no context
  just means the server cannot tell); then NBD_OPT_GO asking for
  NBD_INFO_BLOCK_SIZE; a server without GO (ERR_UNSUP) gets EXPORT_NAME instead, unless it took
  extended headers (then it MUST know GO, and EXPORT_NAME is forbidden).
Options are sent one at a time: the next only after the final reply to the previous one.
With ``starttls`` the first option is NBD_OPT_STARTTLS; its ACK sets ``wants_tls``: the caller
runs the TLS handshake and calls ``tls_started``, and negotiation goes on inside TLS. A refusal,
or a server that cannot do STARTTLS (oldstyle, non-fixed newstyle), is an error: the caller asked
for TLS and never falls back to the clear.

``ClientTransmission`` encodes compact or extended (32-byte) requests and decodes simple,
structured and extended replies. It refuses to
send what the server did not advertise (command flags, TRIM, WRITE_ZEROES, CACHE, FLUSH): an
xnbd-server drops the connection on any of those.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from .consts import (
    BASE_ALLOCATION,
    CLISERV_MAGIC,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .errors import NBDError, ProtocolError
from .wire import (
    BLOCK_STATUS_EXT_HEAD,
    CHUNK,
    CLIENT_FLAGS,
    ERROR_HEAD,
    EXPORT_NAME_REPLY,
    EXTENDED_CHUNK,
    EXTENDED_REQUEST,
    EXTENT,
    EXTENT_EXT,
    GREETING_HEAD,
    HANDSHAKE_FLAGS,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OFFSET_HOLE,
    OLDSTYLE_REST,
    OPTION_HEADER,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    U32,
    U64,
)

_U32_MAX = 0xFFFFFFFF

ZERO_PADDING = 124
_NO_FLAGS = CmdFlag(0)
MAX_OPTION_REPLY = 1 << 20  # an option reply this long is not a sane server


class HandshakeStyle(Enum):
    OLDSTYLE = auto()
    NEWSTYLE = auto()  # non-fixed: EXPORT_NAME only
    FIXED_NEWSTYLE = auto()


class OptionRefused(NBDError):
    """The server answered our option with an ``NBD_REP_ERR_*`` (e.g. unknown export name)."""

    def __init__(self, option: Opt, rep: int, message: str) -> None:
        try:
            name = Rep(rep).name
        except ValueError:
            name = f"error {rep:#x}"
        super().__init__(
            f"server refused {option.name}: {name}" + (f": {message}" if message else "")
        )
        self.option = option
        self.rep = rep
        self.message = message


class ClientUsageError(NBDError):
    """We asked for something the negotiated connection does not allow (a bug on our side)."""


@dataclass(frozen=True)
class Connected:
    """The handshake is over; transmission starts with the next byte."""

    style: HandshakeStyle
    size: int
    tx_flags: TxFlag
    structured: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = MAX_PAYLOAD  # the spec's default when the server says nothing
    extended: bool = False  # 32-byte headers (implies structured)
    allocation_id: int | None = None  # the server's context id for base:allocation


class _HS(Enum):
    GREETING = auto()
    OLDSTYLE = auto()
    HANDSHAKE_FLAGS = auto()
    OPTION_REPLY = auto()
    EXPORT_NAME_ANSWER = auto()
    DONE = auto()


class ClientHandshake:
    """Client side of the handshake. ``receive_data`` returns ``Connected`` once it is over."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        extended_headers: bool = True,
        starttls: bool = False,
        allocation: bool = False,
    ) -> None:
        name = export_name.encode()
        if len(name) > MAX_STRING:
            raise ClientUsageError(f"export name longer than {MAX_STRING} bytes")
        self._name = name
        self._want_structured = structured_replies
        self._want_extended = extended_headers
        self._starttls = starttls
        self._want_allocation = allocation
        self._allocation_id: int | None = None
        self.wants_tls = False  # STARTTLS acknowledged: upgrade, then ``tls_started``
        self._state = _HS.GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._option: Opt | None = None  # the option whose replies we are reading
        self._structured = False
        self._extended = False
        self._no_zeroes = False
        self._style = HandshakeStyle.OLDSTYLE
        self._export: tuple[int, TxFlag] | None = None
        self._block_size = (1, 4096, MAX_PAYLOAD)
        self.result: Connected | None = None

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (they belong to transmission)."""
        return bytes(self._buffer)

    def receive_data(self, data: bytes | bytearray) -> Connected | None:
        """Feed received bytes; returns ``Connected`` when the handshake is complete.
        EOF (``b""``) before that is a ``ProtocolError``."""
        if self._state is _HS.DONE:
            raise ClientUsageError("handshake already complete")
        if self.wants_tls:
            raise ClientUsageError("STARTTLS was acknowledged: upgrade to TLS first")
        if not data:
            raise ProtocolError("server closed the connection during the handshake")
        self._buffer += data
        while self.result is None and not self.wants_tls and self._step():
            pass
        return self.result

    def tls_started(self) -> None:
        """The TLS handshake succeeded: negotiate the export inside it."""
        if not self.wants_tls:
            raise ClientUsageError("tls_started without an acknowledged STARTTLS")
        if self._buffer:
            raise ProtocolError("server sent data in the clear after acknowledging STARTTLS")
        self.wants_tls = False
        self._first_option()

    def _take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            return None
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    def _step(self) -> bool:
        """Advance by one message; False when more bytes are needed."""
        if self._state is _HS.GREETING:
            head = self._take(GREETING_HEAD.size)
            if head is None:
                return False
            magic, kind = GREETING_HEAD.unpack(head)
            if magic != NBDMAGIC:
                raise ProtocolError(f"not an NBD server (greeting magic {magic:#x})")
            if kind == CLISERV_MAGIC:
                self._state = _HS.OLDSTYLE
            elif kind == IHAVEOPT:
                self._state = _HS.HANDSHAKE_FLAGS
            else:
                raise ProtocolError(f"unknown greeting {kind:#x}")
            return True
        if self._state is _HS.OLDSTYLE:
            if self._starttls:
                raise ProtocolError("an oldstyle server cannot do TLS")
            rest = self._take(OLDSTYLE_REST.size)
            if rest is None:
                return False
            size, flags, _zeros = OLDSTYLE_REST.unpack(rest)
            self._finish(HandshakeStyle.OLDSTYLE, size, flags & 0xFFFF)
            return True
        if self._state is _HS.HANDSHAKE_FLAGS:
            raw = self._take(HANDSHAKE_FLAGS.size)
            if raw is None:
                return False
            (hflags,) = HANDSHAKE_FLAGS.unpack(raw)
            self._start_newstyle(HandshakeFlag(hflags & 0x3))
            return True
        if self._state is _HS.OPTION_REPLY:
            return self._option_reply()
        if self._state is _HS.EXPORT_NAME_ANSWER:
            need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else ZERO_PADDING)
            raw = self._take(need)
            if raw is None:
                return False
            size, flags = EXPORT_NAME_REPLY.unpack_from(raw)
            self._finish(self._style, size, flags)
            return True
        raise AssertionError(self._state)

    def _start_newstyle(self, hflags: HandshakeFlag) -> None:
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            # xnbd-wrapper: a non-fixed server knows only EXPORT_NAME and always sends the zeros.
            if self._starttls:
                raise ProtocolError("a server without fixed newstyle cannot do TLS")
            self._style = HandshakeStyle.NEWSTYLE
            self._outgoing += CLIENT_FLAGS.pack(0)
            self._send_export_name()
            return
        self._style = HandshakeStyle.FIXED_NEWSTYLE
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:  # C_NO_ZEROES only when offered (spec MUST)
            cflags |= ClientFlag.C_NO_ZEROES
            self._no_zeroes = True
        self._outgoing += CLIENT_FLAGS.pack(cflags)
        if self._starttls:
            self._send_option(Opt.STARTTLS, b"")
        else:
            self._first_option()

    def _first_option(self) -> None:
        if self._want_extended:
            self._send_option(Opt.EXTENDED_HEADERS, b"")
        elif self._want_structured:
            self._send_option(Opt.STRUCTURED_REPLY, b"")
        else:
            self._send_go()

    def _send_option(self, option: Opt, data: bytes) -> None:
        self._outgoing += OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data
        self._option = option
        self._state = _HS.OPTION_REPLY

    def _after_structured(self) -> None:
        """Structured replies are on: ask for base:allocation if wanted, then GO."""
        if not self._want_allocation:
            self._send_go()
            return
        query = BASE_ALLOCATION.encode()
        data = U32.pack(len(self._name)) + self._name + U32.pack(1)
        self._send_option(Opt.SET_META_CONTEXT, data + U32.pack(len(query)) + query)

    def _send_go(self) -> None:
        data = struct.pack("!I", len(self._name)) + self._name
        data += struct.pack("!HH", 1, Info.BLOCK_SIZE)
        self._send_option(Opt.GO, data)

    def _send_export_name(self) -> None:
        self._outgoing += (
            OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, len(self._name)) + self._name
        )
        self._state = _HS.EXPORT_NAME_ANSWER

    def _option_reply(self) -> bool:
        if len(self._buffer) < OPTION_REPLY.size:
            return False
        magic, option, rep, length = OPTION_REPLY.unpack_from(self._buffer)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if option != self._option:
            raise ProtocolError(f"reply for option {option}, but we sent {self._option}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes")
        raw = self._take(OPTION_REPLY.size + length)
        if raw is None:
            return False
        payload = raw[OPTION_REPLY.size :]
        assert self._option is not None
        if self._option is Opt.STARTTLS:
            if rep == Rep.ACK:
                self.wants_tls = True
                return True
            raise OptionRefused(Opt.STARTTLS, rep, payload.decode(errors="replace"))
        if self._option is Opt.EXTENDED_HEADERS:
            if rep == Rep.ACK:
                self._extended = self._structured = True
                self._after_structured()
            elif not rep & 0x80000000:
                raise ProtocolError(f"unexpected reply {rep:#x} to EXTENDED_HEADERS")
            elif self._want_structured:  # refused: compact headers, structured if we can
                self._send_option(Opt.STRUCTURED_REPLY, b"")
            else:
                self._send_go()
            return True
        if self._option is Opt.STRUCTURED_REPLY:
            if rep == Rep.ACK:
                self._structured = True
                self._after_structured()
            elif not rep & 0x80000000:
                raise ProtocolError(f"unexpected reply {rep:#x} to STRUCTURED_REPLY")
            else:  # any error: carry on with simple replies (no block status then)
                self._send_go()
            return True
        if self._option is Opt.SET_META_CONTEXT:
            if rep == Rep.META_CONTEXT:
                if len(payload) < U32.size:
                    raise ProtocolError("NBD_REP_META_CONTEXT without a context id")
                (context_id,) = U32.unpack_from(payload)
                if payload[U32.size :] == BASE_ALLOCATION.encode():
                    self._allocation_id = context_id
                return True
            if rep != Rep.ACK and not rep & 0x80000000:
                raise ProtocolError(f"unexpected reply {rep:#x} to SET_META_CONTEXT")
            if rep != Rep.ACK:  # refused: the server cannot tell us its allocation
                self._allocation_id = None
            self._send_go()
            return True
        # Opt.GO
        if rep == Rep.INFO:
            self._info(payload)
        elif rep == Rep.ACK:
            if self._export is None:
                raise ProtocolError("GO acknowledged without NBD_INFO_EXPORT")
            self._finish(HandshakeStyle.FIXED_NEWSTYLE, *self._export)
        elif rep == Rep.ERR_UNSUP and self._extended:
            raise ProtocolError("server took extended headers but refuses GO")
        elif rep == Rep.ERR_UNSUP:
            # An older fixed-newstyle server without GO; structured replies were negotiated
            # through their own option and stay valid.
            self._send_export_name()
        elif rep & 0x80000000:
            raise OptionRefused(Opt.GO, rep, payload.decode(errors="replace"))
        else:
            raise ProtocolError(f"unexpected reply {rep:#x} to GO")
        return True

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("NBD_REP_INFO without a type")
        (kind,) = struct.unpack_from("!H", payload)
        if kind == Info.EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
            _kind, size, flags = INFO_EXPORT.unpack(payload)
            self._export = (size, flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
            _kind, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
            self._block_size = (minimum, preferred, maximum)
        # other info types (NAME, DESCRIPTION, unknown ones) are allowed and ignored

    def _finish(self, style: HandshakeStyle, size: int, flags: int) -> None:
        minimum, preferred, maximum = self._block_size
        self.result = Connected(
            style=style,
            size=size,
            tx_flags=TxFlag(flags),
            structured=self._structured,
            min_block=max(minimum, 1),
            preferred_block=preferred,
            max_payload=min(maximum, MAX_PAYLOAD) if maximum else MAX_PAYLOAD,
            extended=self._extended,
            allocation_id=self._allocation_id,
        )
        self._state = _HS.DONE


# -- transmission ----------------------------------------------------------------------------


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
