"""Server side of the NBD handshake: oldstyle and fixed newstyle (proto.md "Handshake").

Sans-IO: feed bytes with ``receive_data``, take bytes with ``data_to_send``, and look at ``state``.
When the machine needs something only the server knows, it stops in state ``WAITING`` with an
``event``: ``ExportRequested`` is answered with ``provide_export`` or ``refuse``, ``ListRequested``
with ``provide_list``; bytes that arrive meanwhile are kept until then. So the answer may take its
time (the wrapper starts an export's server before it answers GO). One driver runs the machine for
every server: xnbdd/negotiation.py.
Rules kept here:
- the greeting offers FIXED_NEWSTYLE | NO_ZEROES and nothing else;
- unknown client flags (or C_NO_ZEROES when not offered) end the connection (MUST);
- every option except EXPORT_NAME gets at least one reply, the last one ACK or an error;
- unknown options get ERR_UNSUP and negotiation continues;
- EXPORT_NAME that cannot be satisfied closes the connection (no error can be sent);
- GO's ACK is followed directly by transmission, never by padding;
- EXTENDED_HEADERS implies structured replies; after it STRUCTURED_REPLY gets
  ERR_EXT_HEADER_REQD and EXPORT_NAME (which the client MUST NOT send then) closes;
  BLOCK_STATUS_PAYLOAD is advertised only with extended headers and selected contexts.
- TLS (proto.md "TLS support"): with ``TLSPolicy.OFF`` STARTTLS is unsupported (ERR_UNSUP,
  never ERR_TLS_REQD); otherwise STARTTLS is ACKed and the driver upgrades the connection before
  feeding more bytes (state STARTTLS, then ``tls_started``), which discards what was negotiated
  in the clear; a second STARTTLS gets ERR_INVALID. Under ``REQUIRE`` every option but STARTTLS
  and ABORT gets ERR_TLS_REQD until then, and EXPORT_NAME closes: nothing about the exports is
  told in the clear.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, auto
from typing import TypeVar

from .consts import (
    CLISERV_MAGIC,
    IHAVEOPT,
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
from .errors import OptionError
from .messages import ExportInfo, Negotiated, transmission_flags
from .wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NEWSTYLE_GREETING,
    OLDSTYLE_GREETING,
    OPTION_HEADER,
    OPTION_REPLY,
    U16,
    U32,
)

OFFERED_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
KNOWN_CLIENT_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
# Options with more data than this are skipped and refused rather than buffered (ERR_TOO_BIG);
# no legitimate option comes near it (strings are at most 4096 bytes).
MAX_OPTION_DATA = 64 * 1024
ZERO_PADDING = bytes(124)


class TLSPolicy(Enum):
    """``off``: NOTLS; ``on``: the client may upgrade, every export works either way;
    ``require``: FORCEDTLS."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class HandshakeState(Enum):
    CLIENT_FLAGS = auto()  # waiting for the client's 32-bit flags
    OPTIONS = auto()  # option haggling
    WAITING = auto()  # ``event`` asks the server something: answer it to go on
    STARTTLS = auto()  # STARTTLS acknowledged: send it, upgrade, then call ``tls_started``
    DONE = auto()  # transmission starts; see ``negotiated``
    CLOSED = auto()  # the connection must be closed (abort or MUST violation)


@dataclass(frozen=True)
class ExportRequested:
    """An option names an export (INFO, GO, EXPORT_NAME, LIST/SET_META_CONTEXT): answer with
    ``provide_export`` (None: there is no such export) or ``refuse``."""

    name: str
    option: int


@dataclass(frozen=True)
class ListRequested:
    """NBD_OPT_LIST: answer with ``provide_list``."""


Event = ExportRequested | ListRequested
E = TypeVar("E", ExportRequested, ListRequested)


def oldstyle_greeting(export: ExportInfo) -> bytes:
    """The 152-byte oldstyle greeting; transmission follows at once."""
    flags = transmission_flags(export.tx_flags)  # simple replies only
    return OLDSTYLE_GREETING.pack(NBDMAGIC, CLISERV_MAGIC, export.size, int(flags))


def option_reply(opt: int, rep: Rep, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def decode_string(raw: bytes, what: str) -> str:
    """Strings are UTF-8 without NUL, at most 4096 bytes (MUST); otherwise ERR_INVALID."""
    if len(raw) > MAX_STRING:
        raise OptionError(Rep.ERR_INVALID, f"{what} longer than {MAX_STRING} bytes")
    if b"\0" in raw:
        raise OptionError(Rep.ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(Rep.ERR_INVALID, f"{what} is not valid UTF-8") from None


def select_contexts(available: Iterable[str], queries: list[str]) -> list[str]:
    """Contexts matching the queries: an exact name, or ``namespace:`` for a whole namespace.
    Unknown namespaces are ignored (proto.md "Metadata querying")."""
    names = list(available)
    chosen: list[str] = []
    for query in queries:
        for name in names:
            matches = name == query or (query.endswith(":") and name.startswith(query))
            if matches and name not in chosen:
                chosen.append(name)
    return chosen


class ServerHandshake:
    """One client's handshake.

    ``oldstyle``: greet with this export (oldstyle has no options); ``refusal``: refuse every
    option with ERR_POLICY and this text (a limit is reached); ``simple_only``: refuse structured
    replies and extended headers with ERR_UNSUP and this text (a server that cannot send them)."""

    def __init__(
        self,
        *,
        oldstyle: ExportInfo | None = None,
        allow_list: bool = True,
        tls: TLSPolicy = TLSPolicy.OFF,
        refusal: str = "",
        simple_only: str = "",
    ) -> None:
        if oldstyle is not None and tls is not TLSPolicy.OFF:
            raise ValueError("the oldstyle handshake has no STARTTLS")
        self._allow_list = allow_list
        self._refusal = refusal
        self._simple_only = simple_only
        self._in = bytearray()
        self._out = bytearray()
        self._skip = 0  # option data still to discard (oversized option)
        self._skip_opt = 0
        self.no_zeroes = False
        self.structured = False
        self.extended = False
        self._shutting_down = False
        self.tls_policy = tls
        self.tls_active = False
        self.close_reason = ""
        self.negotiated: Negotiated | None = None
        # the question being asked (state WAITING) and what to do with its answer
        self.event: Event | None = None
        self._then: Callable[[ExportInfo], None] = lambda export: None
        # SET_META_CONTEXT result: (export name it was set for, {id: name})
        self._contexts: tuple[str, dict[int, str]] = ("", {})
        if oldstyle is not None:
            self._out += oldstyle_greeting(oldstyle)
            flags = transmission_flags(oldstyle.tx_flags)
            self.negotiated = Negotiated(export=oldstyle, tx_flags=flags)
            self.state = HandshakeState.DONE
        else:
            self._out += NEWSTYLE_GREETING.pack(NBDMAGIC, IHAVEOPT, OFFERED_FLAGS)
            self.state = HandshakeState.CLIENT_FLAGS

    # -- sans-IO surface ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the client and advance as far as they allow."""
        if self.state is HandshakeState.STARTTLS:
            raise RuntimeError("the connection must be upgraded to TLS first")
        if self.state in (HandshakeState.WAITING, HandshakeState.DONE, HandshakeState.CLOSED):
            # Waiting, bytes are kept for after the answer. Bytes after GO/EXPORT_NAME belong to
            # transmission; the caller takes them back with ``leftover``. After CLOSED nothing
            # is read any more.
            self._in += data
            return
        self._in += data
        self._advance()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (pipelined first requests)."""
        rest = bytes(self._in)
        self._in.clear()
        return rest

    def begin_shutdown(self) -> None:
        """The server stops: every option from now on gets ERR_SHUTDOWN (EXPORT_NAME closes)."""
        self._shutting_down = True

    def provide_export(self, export: ExportInfo | None) -> None:
        """Answer ``ExportRequested``; None: no such export."""
        event = self._answered(ExportRequested)
        if export is None:
            if event.option == Opt.EXPORT_NAME:
                # MUST: EXPORT_NAME cannot be answered with an error, so close.
                self._close(f"unknown export {event.name!r}")
            else:
                self._error(event.option, Rep.ERR_UNKNOWN, f"no export named {event.name!r}")
        else:
            self._then(export)
        self._resume()

    def refuse(self, rep: Rep, message: str) -> None:
        """Answer ``ExportRequested`` with an error (EXPORT_NAME, which has none, closes)."""
        event = self._answered(ExportRequested)
        if event.option == Opt.EXPORT_NAME:
            self._close(message)
        else:
            self._error(event.option, rep, message)
        self._resume()

    def provide_list(self, exports: Iterable[ExportInfo]) -> None:
        """Answer ``ListRequested`` with the exports to tell the client about."""
        self._answered(ListRequested)
        for export in exports:
            name = export.name.encode("utf-8")
            # SERVER data: name length, name, then the optional human-readable description.
            payload = U32.pack(len(name)) + name + export.description.encode("utf-8")
            self._out += option_reply(Opt.LIST, Rep.SERVER, payload)
        self._out += option_reply(Opt.LIST, Rep.ACK)
        self._resume()

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: negotiation starts over inside TLS. Bytes
        the client sent behind STARTTLS in the clear (``leftover``) belong to TLS, not here."""
        if self.state is not HandshakeState.STARTTLS:
            raise RuntimeError("tls_started without an acknowledged STARTTLS")
        self.tls_active = True
        self.structured = False
        self.extended = False
        self._contexts = ("", {})
        self.state = HandshakeState.OPTIONS

    @property
    def _tls_missing(self) -> bool:
        return self.tls_policy is TLSPolicy.REQUIRE and not self.tls_active

    # -- the machine ----------------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        self.state = HandshakeState.CLOSED
        self.close_reason = reason

    def _ask(self, event: Event, then: Callable[[ExportInfo], None]) -> None:
        self.event, self._then = event, then
        self.state = HandshakeState.WAITING

    def _answered(self, kind: type[E]) -> E:
        event = self.event
        if self.state is not HandshakeState.WAITING or not isinstance(event, kind):
            raise RuntimeError(f"no {kind.__name__} to answer")
        self.event = None
        self.state = HandshakeState.OPTIONS
        return event

    def _resume(self) -> None:
        """Go on with what the client sent while the machine waited."""
        if self.state is HandshakeState.OPTIONS:
            self._advance()

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._out += option_reply(opt, rep, message.encode("utf-8")[:MAX_STRING])

    def _advance(self) -> None:
        while self.state in (HandshakeState.CLIENT_FLAGS, HandshakeState.OPTIONS):
            if self._skip:
                dropped = min(self._skip, len(self._in))
                del self._in[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
                rep = Rep.ERR_TLS_REQD if self._tls_missing else Rep.ERR_TOO_BIG
                self._out += option_reply(self._skip_opt, rep)
                continue
            if self.state is HandshakeState.CLIENT_FLAGS:
                if len(self._in) < CLIENT_FLAGS.size:
                    return
                (flags,) = CLIENT_FLAGS.unpack_from(self._in)
                del self._in[: CLIENT_FLAGS.size]
                if flags & ~int(KNOWN_CLIENT_FLAGS):  # int: ~ on an IntFlag drops unknown bits
                    # MUST: unknown client flags end the connection.
                    self._close(f"unknown client flags {flags:#x}")
                    return
                self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
                self.state = HandshakeState.OPTIONS
                continue
            if len(self._in) < OPTION_HEADER.size:
                return
            magic, opt, length = OPTION_HEADER.unpack_from(self._in)
            if magic != IHAVEOPT:
                self._close(f"bad option magic {magic:#x}")
                return
            if length > MAX_OPTION_DATA:
                if opt == Opt.EXPORT_NAME:
                    self._close("export name too long")
                    return
                del self._in[: OPTION_HEADER.size]
                self._skip, self._skip_opt = length, opt
                continue
            end = OPTION_HEADER.size + length
            if len(self._in) < end:
                return
            data = bytes(self._in[OPTION_HEADER.size : end])
            del self._in[:end]
            self._option(opt, data)

    def _option(self, opt: int, data: bytes) -> None:
        if opt == Opt.EXPORT_NAME:
            if self._tls_missing:
                # MUST: it cannot be refused with an error, and nothing may go out in the clear.
                self._close("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                return
            self._export_name(data)
            return
        if opt == Opt.ABORT:
            # Data is ignored; ACK then the client closes (or already has).
            self._out += option_reply(opt, Rep.ACK)
            self._close("client sent NBD_OPT_ABORT")
            return
        try:
            if self._simple_only and opt in (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS):
                raise OptionError(Rep.ERR_UNSUP, self._simple_only)
            if self._shutting_down:
                raise OptionError(Rep.ERR_SHUTDOWN, "server shutting down")
            if self._refusal:
                raise OptionError(Rep.ERR_POLICY, self._refusal)
            if opt == Opt.STARTTLS and self.tls_policy is not TLSPolicy.OFF:
                self._starttls(data)
                return
            if self._tls_missing:
                raise OptionError(Rep.ERR_TLS_REQD, "this server requires TLS (NBD_OPT_STARTTLS)")
            handler = {
                Opt.LIST: self._list,
                Opt.INFO: self._info_or_go,
                Opt.GO: self._info_or_go,
                Opt.STRUCTURED_REPLY: self._structured_reply,
                Opt.EXTENDED_HEADERS: self._extended_headers,
                Opt.LIST_META_CONTEXT: self._meta_context,
                Opt.SET_META_CONTEXT: self._meta_context,
            }.get(opt)  # type: ignore[call-overload]
            if handler is None:
                raise OptionError(Rep.ERR_UNSUP, f"option {opt} not supported")
            handler(opt, data)
        except OptionError as err:
            self._error(opt, err.rep, err.message)

    def _starttls(self, data: bytes) -> None:
        if self.tls_active:
            raise OptionError(Rep.ERR_INVALID, "TLS is already running")
        if data:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        self._out += option_reply(Opt.STARTTLS, Rep.ACK)
        self.state = HandshakeState.STARTTLS

    def _export_name(self, data: bytes) -> None:
        if self._shutting_down or self._refusal:  # this option cannot carry an error: close
            self._close(self._refusal or "server shutting down")
            return
        if self.extended:
            # MUST NOT after extended headers, and EXPORT_NAME has no error reply: close.
            self._close("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS")
            return
        try:
            name = decode_string(data, "export name")
        except OptionError as err:
            self._close(err.message)
            return
        self._ask(ExportRequested(name, Opt.EXPORT_NAME), self._export_name_reply)

    def _export_name_reply(self, export: ExportInfo) -> None:
        flags = self._tx_flags(export)
        self._out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += ZERO_PADDING
        self._finish(export, flags)

    def _selected(self, export: ExportInfo) -> dict[int, str]:
        set_for, contexts = self._contexts
        # contexts selected for another export do not carry over
        return contexts if set_for == export.name else {}

    def _tx_flags(self, export: ExportInfo) -> TxFlag:
        return transmission_flags(
            export.tx_flags,
            structured=self.structured,
            extended=self.extended,
            contexts=bool(self._selected(export)),
        )

    def _finish(self, export: ExportInfo, flags: TxFlag) -> None:
        self.negotiated = Negotiated(
            export=export,
            tx_flags=flags,
            structured=self.structured,
            meta_contexts=self._selected(export),
            extended=self.extended,
        )
        self.state = HandshakeState.DONE

    def _list(self, opt: int, data: bytes) -> None:
        if data:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        if not self._allow_list:
            raise OptionError(Rep.ERR_POLICY, "listing exports is disabled")
        self._ask(ListRequested(), lambda export: None)

    def _info_or_go(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            raise OptionError(Rep.ERR_INVALID, "INFO/GO data too short")
        (name_len,) = U32.unpack_from(data)
        if name_len > len(data) - 6:
            raise OptionError(Rep.ERR_INVALID, "export name length exceeds option length")
        name = decode_string(data[4 : 4 + name_len], "export name")
        (count,) = U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            raise OptionError(Rep.ERR_INVALID, "information request count does not match")
        requests = struct.unpack_from(f"!{count}H", data, 6 + name_len)
        self._ask(
            ExportRequested(name, opt), lambda export: self._info_reply(opt, requests, export)
        )

    def _info_reply(self, opt: int, requests: tuple[int, ...], export: ExportInfo) -> None:
        flags = self._tx_flags(export)
        self._out += option_reply(opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._out += option_reply(
                opt, Rep.INFO, U16.pack(Info.NAME) + export.name.encode("utf-8")
            )
        if Info.DESCRIPTION in requests and export.description:
            self._out += option_reply(
                opt, Rep.INFO, U16.pack(Info.DESCRIPTION) + export.description.encode("utf-8")
            )
        # policy: block sizes are always sent, so ERR_BLOCK_SIZE_REQD is never needed.
        self._out += option_reply(
            opt,
            Rep.INFO,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_payload
            ),
        )
        self._out += option_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._finish(export, flags)

    def _structured_reply(self, opt: int, data: bytes) -> None:
        if data:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended:
            raise OptionError(Rep.ERR_EXT_HEADER_REQD, "extended headers are already in use")
        self.structured = True
        self._out += option_reply(opt, Rep.ACK)

    def _extended_headers(self, opt: int, data: bytes) -> None:
        if data:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        # Implies structured replies: every rule of those holds, with the 32-byte header.
        self.extended = self.structured = True
        self._out += option_reply(opt, Rep.ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            raise OptionError(Rep.ERR_INVALID, "metadata contexts need structured replies")
        name, queries = self._parse_meta_request(data)
        self._ask(ExportRequested(name, opt), lambda export: self._meta_reply(opt, queries, export))

    def _meta_reply(self, opt: int, queries: list[str], export: ExportInfo) -> None:
        if opt == Opt.LIST_META_CONTEXT:
            chosen = (
                list(export.meta_contexts)
                if not queries
                else select_contexts(export.meta_contexts, queries)
            )
            for ctx in chosen:
                self._out += option_reply(opt, Rep.META_CONTEXT, U32.pack(0) + ctx.encode())
        else:
            selected = {
                index: ctx
                for index, ctx in enumerate(select_contexts(export.meta_contexts, queries), 1)
            }
            for index, ctx in selected.items():
                self._out += option_reply(opt, Rep.META_CONTEXT, U32.pack(index) + ctx.encode())
            self._contexts = (export.name, selected)
        self._out += option_reply(opt, Rep.ACK)

    @staticmethod
    def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
        def take(pos: int, size: int) -> bytes:
            if pos + size > len(data):
                raise OptionError(Rep.ERR_INVALID, "metadata context request is truncated")
            return data[pos : pos + size]

        (name_len,) = U32.unpack(take(0, 4))
        name = decode_string(take(4, name_len), "export name")
        pos = 4 + name_len
        (count,) = U32.unpack(take(pos, 4))
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = U32.unpack(take(pos, 4))
            queries.append(decode_string(take(pos + 4, qlen), "context query"))
            pos += 4 + qlen
        if pos != len(data):
            raise OptionError(Rep.ERR_INVALID, "trailing data after metadata context queries")
        return name, queries
