"""The client side of NBD's handshake (doc/proto.md "Handshake"), sans-IO.

Used by the proxy's link to its origin server and by tests. Bytes in, events out: the caller feeds
whatever arrived with ``receive_data`` and sends whatever ``data_to_send`` returns; nothing here
touches a socket. The transmission phase that follows is ``client_transmission.py``.

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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, auto

from .consts import (
    BASE_ALLOCATION,
    CLISERV_MAGIC,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from .errors import NBDError, ProtocolError
from .wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING_HEAD,
    HANDSHAKE_FLAGS,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OLDSTYLE_REST,
    OPTION_HEADER,
    OPTION_REPLY,
    U32,
)

ZERO_PADDING = 124
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
