"""The wrapper's NBD side: negotiate fixed newstyle with a client, then hand it to its export.

The handshake machine (xnbdd/proto/handshake.py) asks for an export's size and flags through a
synchronous lookup, but learning them may mean starting the export's server. So the client's bytes
are cut into whole options here first; before an option naming an export is fed to the machine,
that export's information is fetched (asynchronously), and the lookup only reads what was
fetched. Bytes after GO/EXPORT_NAME travel with the hand-off as pipelined requests.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field

import trio

from ..listeners import peer_name
from ..proto.consts import IHAVEOPT, Opt, Rep, TxFlag
from ..proto.errors import OptionError
from ..proto.handshake import MAX_OPTION_DATA, HandshakeState, ServerHandshake, option_reply
from ..proto.messages import ExportInfo
from .registry import Registry
from .supervisor import StartError, Supervisor

log = logging.getLogger("xnbdd")

OPTION_HEADER = struct.Struct("!QII")
U32 = struct.Struct("!I")
NAMED_OPTIONS = (Opt.EXPORT_NAME, Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT)


@dataclass
class OptionFramer:
    """Cuts the client's bytes into the 4 flag bytes and then whole options."""

    buffer: bytearray = field(default_factory=bytearray)
    flags_seen: bool = False
    skipping: int = 0  # data of an oversized option: passed through, the machine discards it

    def next_piece(self) -> tuple[bytes, int | None, bytes] | None:
        """(raw bytes to feed, option number or None, option data), or None for more input."""
        buf = self.buffer
        if not self.flags_seen:
            if len(buf) < 4:
                return None
            self.flags_seen = True
            return self._take(4), None, b""
        if self.skipping:
            if not buf:
                return None
            piece = self._take(min(self.skipping, len(buf)))
            self.skipping -= len(piece)
            return piece, None, b""
        if len(buf) < OPTION_HEADER.size:
            return None
        magic, opt, length = OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            return self._take(len(buf)), None, b""  # the machine closes the connection
        if length > MAX_OPTION_DATA:
            self.skipping = length
            return self._take(OPTION_HEADER.size), None, b""
        if len(buf) < OPTION_HEADER.size + length:
            return None
        raw = self._take(OPTION_HEADER.size + length)
        return raw, opt, raw[OPTION_HEADER.size :]

    def _take(self, size: int) -> bytes:
        piece = bytes(self.buffer[:size])
        del self.buffer[:size]
        return piece


def option_export_name(opt: int, data: bytes) -> str | None:
    """The export an option is about, if it names one (malformed: None, the machine replies)."""
    try:
        if opt == Opt.EXPORT_NAME:
            return data.decode("utf-8")
        (length,) = U32.unpack_from(data)
        return data[4 : 4 + length].decode("utf-8")
    except (struct.error, UnicodeDecodeError):
        return None


class Frontend:
    def __init__(
        self,
        registry: Registry,
        supervisor: Supervisor,
        *,
        handoff: bool = True,
        handshake_timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        self.supervisor = supervisor
        self.handoff = handoff
        self.handshake_timeout = handshake_timeout
        self.stopping = False

    async def serve(self, stream: trio.SocketStream) -> None:
        """Negotiate, then hand the client over; the wrapper never serves transmission itself."""
        peer = peer_name(stream)
        fields = {"XNBD_CLIENT": peer}
        try:
            result = await self._negotiate(stream, fields)
            if result is None:
                return
            hs, pending = result
            await self._hand_over(stream, hs, pending, fields)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _negotiate(
        self, stream: trio.SocketStream, fields: dict[str, str]
    ) -> tuple[ServerHandshake, bytes] | None:
        infos: dict[str, ExportInfo] = {}
        failures: dict[str, str] = {}
        current: list[int] = [0]  # the option being fed, for the lookup's error choice

        def lookup(name: str) -> ExportInfo | None:
            if name in failures and current[0] != Opt.EXPORT_NAME:
                raise OptionError(Rep.ERR_UNKNOWN, failures[name])
            return infos.get(name)

        def lister() -> list[ExportInfo]:
            return [
                infos.get(entry.name)
                or self.supervisor.cached_info(entry.name)
                or ExportInfo(
                    name=entry.name,
                    size=0,
                    tx_flags=TxFlag.HAS_FLAGS,
                    description=entry.description,
                )
                for _, entry in self.registry
            ]

        hs = ServerHandshake(lookup, lister)
        framer = OptionFramer()
        with trio.move_on_after(self.handshake_timeout):
            while True:
                out = hs.data_to_send()
                if out:
                    await stream.send_all(out)
                if hs.state is HandshakeState.DONE:
                    return hs, hs.leftover() + bytes(framer.buffer)
                if hs.state is HandshakeState.CLOSED:
                    log.debug("handshake ended: %s", hs.close_reason, extra=fields)
                    return None
                piece = framer.next_piece()
                if piece is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return None
                    framer.buffer += data
                    continue
                raw, opt, data = piece
                hs.shutting_down = self.stopping
                if opt in NAMED_OPTIONS and not self.stopping:
                    name = option_export_name(opt, data)
                    if name is not None:
                        # GO/EXPORT_NAME start the export's server first, so the client is
                        # told what that server advertises, and a failed start is an error
                        # reply instead of a connection dropped after a successful GO.
                        start = opt in (Opt.GO, Opt.EXPORT_NAME)
                        await self._learn(name, infos, failures, start=start)
                if opt in (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS) and not self.handoff:
                    # --connected-fd servers speak simple replies only; say so up front.
                    await stream.send_all(
                        option_reply(opt, Rep.ERR_UNSUP, b"structured replies need the hand-off")
                    )
                    continue
                current[0] = opt or 0
                hs.receive_data(raw)
        log.info("handshake timed out", extra=fields)
        return None

    async def _learn(
        self, name: str, infos: dict[str, ExportInfo], failures: dict[str, str], *, start: bool
    ) -> None:
        entry = self.registry.get(name)
        if entry is None:
            infos.pop(name, None)
            return
        try:
            if start and self.handoff:
                infos[name] = (await self.supervisor.ensure(entry)).info
            elif not self.handoff and entry.server_mode != "target":
                raise StartError("without the hand-off only target exports are served")
            else:
                infos[name] = await self.supervisor.learn_info(entry)
            failures.pop(name, None)
        except StartError as err:
            log.warning("export %r is not available: %s", name, err)
            infos.pop(name, None)
            failures[name] = f"export {name!r} is not available: {err}"

    async def _hand_over(
        self, stream: trio.SocketStream, hs: ServerHandshake, pending: bytes, fields: dict[str, str]
    ) -> None:
        negotiated = hs.negotiated
        assert negotiated is not None
        name = negotiated.export.name
        entry = self.registry.get(name)
        if entry is None:
            log.info("export %r was removed during the handshake", name, extra=fields)
            return
        client = socket.socket(fileno=stream.socket.detach())
        try:
            if self.handoff:
                proc = await self.supervisor.hand_over(entry, client, negotiated, pending)
                log.info("client handed to export %r (pid %d)", name, proc.pid, extra=fields)
            elif pending:
                log.warning(
                    "client pipelined requests behind the handshake; --connected-fd "
                    "cannot carry them, closing",
                    extra=fields,
                )
            else:
                await self.supervisor.connected_fd(entry, client)
                log.info("client passed to a new server for export %r", name, extra=fields)
        except StartError as err:
            log.warning("client of export %r dropped: %s", name, err, extra=fields)
        finally:
            client.close()
