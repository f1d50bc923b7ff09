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
    each connection's flags come from ``transmission_flags``.
    """

    name: str
    size: int
    tx_flags: TxFlag
    description: str = ""
    min_block: int = MIN_BLOCK
    preferred_block: int = PREFERRED_BLOCK
    max_payload: int = MAX_PAYLOAD
    meta_contexts: tuple[str, ...] = ()


def transmission_flags(
    export_flags: TxFlag,
    *,
    structured: bool = False,
    extended: bool = False,
    contexts: bool = False,
) -> TxFlag:
    """The flags one connection sees, the only place that decides them: SEND_DF only with
    structured replies (or extended headers, which imply them; proto.md: the server MUST NOT set
    it otherwise), BLOCK_STATUS_PAYLOAD only with extended headers and metadata contexts
    selected. The defaults are a connection with simple replies (oldstyle, --connected-fd)."""
    flags = export_flags | TxFlag.HAS_FLAGS
    flags &= ~(TxFlag.SEND_DF | TxFlag.BLOCK_STATUS_PAYLOAD)
    if structured or extended:
        flags |= TxFlag.SEND_DF
    if extended and contexts:
        flags |= TxFlag.BLOCK_STATUS_PAYLOAD
    return flags


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake: which export, and how to talk during transmission.

    ``extended``: 32-byte request and reply headers (NBD_OPT_EXTENDED_HEADERS); it implies
    ``structured`` (every rule of structured replies holds, with the extended header).
    """

    export: ExportInfo
    tx_flags: TxFlag
    structured: bool = False
    meta_contexts: dict[int, str] = field(default_factory=dict)  # context id -> name
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission-phase request. ``data`` is its payload (a WRITE's; with extended headers
    any command may carry one); None when there was none or it was discarded. ``contexts``: the
    metadata context ids a BLOCK_STATUS payload asked for (None: every selected context)."""

    cookie: int
    cmd: int  # an int, not Cmd: unknown numbers must still be answered (EINVAL)
    flags: int
    offset: int
    length: int
    data: bytes | bytearray | None = None
    contexts: tuple[int, ...] | None = None

    @property
    def command(self) -> Cmd | None:
        try:
            return Cmd(self.cmd)
        except ValueError:
            return None

    def has(self, flag: CmdFlag) -> bool:
        return bool(self.flags & flag)
