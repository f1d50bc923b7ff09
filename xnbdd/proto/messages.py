"""Wire messages of the NBD protocol as frozen dataclasses (nouns; the machines are verbs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .consts import (
    MAX_PAYLOAD,
    MIN_BLOCK,
    PREFERRED_BLOCK,
    Cmd,
    CmdFlag,
    TxFlag,
)


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about one export.

    ``tx_flags`` is computed by the server from its backend's capabilities, without SEND_DF:
    DF is added per connection only when structured replies were negotiated.
    """

    name: str
    size: int
    tx_flags: TxFlag
    description: str = ""
    min_block: int = MIN_BLOCK
    preferred_block: int = PREFERRED_BLOCK
    max_payload: int = MAX_PAYLOAD
    meta_contexts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake: which export, and how to talk during transmission."""

    export: ExportInfo
    tx_flags: TxFlag
    structured: bool = False
    meta_contexts: dict[int, str] = field(default_factory=dict)  # context id -> name


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission-phase request. ``data`` is the WRITE payload (None when it was discarded)."""

    cookie: int
    cmd: int  # an int, not Cmd: unknown numbers must still be answered (EINVAL)
    flags: int
    offset: int
    length: int
    data: bytes | bytearray | None = None

    @property
    def command(self) -> Cmd | None:
        try:
            return Cmd(self.cmd)
        except ValueError:
            return None

    def has(self, flag: CmdFlag) -> bool:
        return bool(self.flags & flag)
