"""The one async driver of the sans-IO server handshake (proto/handshake.py), for the daemon's
connections (connection.py) and the wrapper's front end (wrapper/frontend.py).

It moves bytes between the client and the machine and answers the machine's events through a
``HandshakeHost``: the host looks exports up (asynchronously: the wrapper starts an export's
server before it answers GO), lists them, says whether the server stops, and upgrades the channel
after STARTTLS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from .proto.errors import OptionError
from .proto.handshake import ExportRequested, HandshakeState, ListRequested, ServerHandshake
from .proto.messages import ExportInfo, Negotiated

log = logging.getLogger("xnbdd")

RECEIVE_SIZE = 65536


class Channel(Protocol):
    """A byte stream to the client: a trio stream, or TLS over one."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes: ...


class HandshakeHost(Protocol):
    """What the driver asks the server while a client negotiates."""

    async def find_export(self, event: ExportRequested) -> ExportInfo | None:
        """The export the option names, None if there is none; raise OptionError to refuse."""
        ...

    def list_exports(self) -> Iterable[ExportInfo]: ...

    def shutting_down(self) -> bool: ...

    async def start_tls(self, early: bytes) -> Channel | None:
        """Upgrade after STARTTLS's ACK (``early``: what the client sent behind it); None when
        the TLS handshake failed and the session ends."""
        ...


async def negotiate(
    hs: ServerHandshake, channel: Channel, host: HandshakeHost, fields: dict[str, str]
) -> tuple[Negotiated, bytes] | None:
    """Run the handshake to its end: what was negotiated and the bytes the client sent behind
    it (pipelined requests), or None when the client left, aborted, broke a MUST or failed its
    TLS handshake. The caller bounds it in time (a cancel scope)."""
    while True:
        out = hs.data_to_send()
        if out:
            await channel.send_all(out)
        if hs.state is HandshakeState.DONE:
            assert hs.negotiated is not None
            return hs.negotiated, hs.leftover()
        if hs.state is HandshakeState.CLOSED:
            log.debug("handshake ended: %s", hs.close_reason, extra=fields)
            return None
        if hs.state is HandshakeState.WAITING:
            await _answer(hs, host)
            continue
        if hs.state is HandshakeState.STARTTLS:
            upgraded = await host.start_tls(hs.leftover())
            if upgraded is None:
                return None
            channel = upgraded
            hs.tls_started()
            continue
        data = await channel.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        if host.shutting_down():
            hs.begin_shutdown()
        hs.receive_data(data)


async def _answer(hs: ServerHandshake, host: HandshakeHost) -> None:
    event = hs.event
    if isinstance(event, ListRequested):
        hs.provide_list(host.list_exports())
        return
    assert isinstance(event, ExportRequested)
    try:
        export = await host.find_export(event)
    except OptionError as err:
        hs.refuse(err.rep, err.message)
        return
    hs.provide_export(export)
