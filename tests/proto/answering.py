"""A synchronous stand-in for the handshake driver (xnbdd/negotiation.py) in sans-IO tests: the
machine's events are answered at once, from a lookup and a lister, after every feed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from xnbdd.proto.handshake import ExportRequested, HandshakeState, ServerHandshake
from xnbdd.proto.messages import ExportInfo

Lookup = Callable[[str], ExportInfo | None]
Lister = Callable[[], Iterable[ExportInfo]]


def answer(hs: ServerHandshake, lookup: Lookup, lister: Lister) -> None:
    """Answer events until the machine needs more bytes or has ended."""
    while hs.state is HandshakeState.WAITING:
        event = hs.event
        if isinstance(event, ExportRequested):
            hs.provide_export(lookup(event.name))
        else:
            hs.provide_list(lister())


class AnsweringHandshake(ServerHandshake):
    """A server handshake whose events are answered as soon as they arise."""

    def __init__(self, lookup: Lookup, lister: Lister, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lookup, self.lister = lookup, lister

    def receive_data(self, data: bytes | bytearray) -> None:
        super().receive_data(data)
        answer(self, self.lookup, self.lister)
