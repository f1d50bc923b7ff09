"""The wrapper's NBD side: negotiate fixed newstyle with a client, then hand it to its export.

The handshake runs on the common driver (xnbdd/negotiation.py). When an option names an export,
the machine asks for it and waits: GO and EXPORT_NAME start the export's server first, so the
client is told what that server advertises, and a failed start is an error reply instead of a
connection dropped after a successful GO. Bytes after GO/EXPORT_NAME travel with the hand-off as
pipelined requests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

import trio

from ..listeners import peer_name
from ..negotiation import Channel, negotiate
from ..proto.consts import Opt, Rep, TxFlag
from ..proto.errors import OptionError
from ..proto.handshake import ExportRequested, ServerHandshake
from ..proto.messages import ExportInfo, Negotiated
from .registry import Registry
from .supervisor import StartError, Supervisor

log = logging.getLogger("xnbdd")


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
            # --connected-fd servers speak simple replies only; say so up front.
            simple_only = "" if self.handoff else "structured replies need the hand-off"
            hs = ServerHandshake(simple_only=simple_only)
            result = None
            with trio.move_on_after(self.handshake_timeout) as scope:
                result = await negotiate(hs, stream, _Lookup(self), fields)
            if scope.cancelled_caught:
                log.info("handshake timed out", extra=fields)
            if result is None:
                return
            negotiated, pending = result
            await self._hand_over(stream, negotiated, pending, fields)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _hand_over(
        self,
        stream: trio.SocketStream,
        negotiated: Negotiated,
        pending: bytes,
        fields: dict[str, str],
    ) -> None:
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


class _Lookup:
    """One client's answers to the handshake (the driver's HandshakeHost): what it learnt of
    each export it named."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.infos: dict[str, ExportInfo] = {}

    async def find_export(self, event: ExportRequested) -> ExportInfo | None:
        front = self.frontend
        name = event.name
        entry = front.registry.get(name)
        if entry is None:
            self.infos.pop(name, None)
            return None
        try:
            if event.option in (Opt.GO, Opt.EXPORT_NAME) and front.handoff:
                info = (await front.supervisor.ensure(entry)).info
            elif not front.handoff and entry.server_mode != "target":
                raise StartError("without the hand-off only target exports are served")
            else:
                info = await front.supervisor.learn_info(entry)
        except StartError as err:
            log.warning("export %r is not available: %s", name, err)
            self.infos.pop(name, None)
            raise OptionError(Rep.ERR_UNKNOWN, f"export {name!r} is not available: {err}") from None
        self.infos[name] = info
        return info

    def list_exports(self) -> Iterable[ExportInfo]:
        front = self.frontend
        return [
            self.infos.get(entry.name)
            or front.supervisor.cached_info(entry.name)
            or ExportInfo(
                name=entry.name,
                size=0,
                tx_flags=TxFlag.HAS_FLAGS,
                description=entry.description,
            )
            for _, entry in front.registry
        ]

    def shutting_down(self) -> bool:
        return self.frontend.stopping

    async def start_tls(self, early: bytes) -> Channel | None:
        raise AssertionError("the wrapper refuses TLS at start-up; its machine never ACKs it")
