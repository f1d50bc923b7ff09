"""Transmission phase: the request layout, request validation and reply encoding.

Rules kept here (proto.md "Transmission", docs/protocol-rules.md rules 25-29):
- unknown commands and flags, out-of-range READ/TRIM/CACHE/BLOCK_STATUS -> EINVAL; WRITE and
  WRITE_ZEROES past the end -> ENOSPC; writes on a read-only export -> EPERM;
- range checks use Python integers, so offset + length cannot wrap.

Framing (where a request ends, how a refused WRITE's payload is dropped to stay in step, when a
bad magic or an undrainable WRITE closes the connection) is done by the data plane
(``xnbdd/dataplane.py``) straight on its receive buffer, without a copy; ``REQUEST`` and
``DRAIN_LIMIT`` are its numbers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .consts import (
    MAX_PAYLOAD,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .errors import RequestError
from .messages import Request

REQUEST = struct.Struct("!IHHQQI")
SIMPLE_REPLY = struct.Struct("!IIQ")
CHUNK = struct.Struct("!IHHQI")
OFFSET_DATA = struct.Struct("!IHHQIQ")  # chunk header + 8-byte offset
OFFSET_HOLE = struct.Struct("!IHHQIQI")
ERROR_HEAD = struct.Struct("!IH")
U64 = struct.Struct("!Q")
U32 = struct.Struct("!I")
EXTENT = struct.Struct("!II")

# WRITE payloads above the maximum are drained up to this size (the client gets EINVAL and stays
# in step); beyond it the request is treated as denial of service and the connection is closed.
DRAIN_LIMIT = 256 * 1024 * 1024

# Command flags each command accepts; FUA is accepted on every command (spec).
ALLOWED_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
# The transmission flag that must have been advertised for a command to be valid.
REQUIRED_TX_FLAG: dict[Cmd, TxFlag] = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
}
WRITING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
SPACE_CONSUMING = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES})  # past the end -> ENOSPC
KNOWN_COMMANDS = frozenset(int(c) for c in ALLOWED_FLAGS)

# The hot path compares plain ints: building enum members per request costs measurable time.
_WRITE = int(Cmd.WRITE)
_DF = int(CmdFlag.DF)
_FUA = int(CmdFlag.FUA)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_ALLOWED = {int(cmd): int(flags) for cmd, flags in ALLOWED_FLAGS.items()}
_REQUIRED = {int(cmd): int(flag) for cmd, flag in REQUIRED_TX_FLAG.items()}
_WRITING = frozenset(int(c) for c in WRITING)
_SPACE_CONSUMING = frozenset(int(c) for c in SPACE_CONSUMING)
_PAYLOAD = frozenset({int(Cmd.READ), _WRITE})
_SEND_FAST_ZERO, _SEND_FUA = int(TxFlag.SEND_FAST_ZERO), int(TxFlag.SEND_FUA)
_READ_ONLY = int(TxFlag.READ_ONLY)


def check_request(
    req: Request,
    *,
    size: int,
    tx_flags: TxFlag,
    structured: bool,
    has_contexts: bool,
    max_payload: int = MAX_PAYLOAD,
) -> None:
    """Raise RequestError with the spec's errno if ``req`` must be refused."""
    cmd = req.cmd
    allowed = _ALLOWED.get(cmd)
    if allowed is None:
        raise RequestError(Errno.EINVAL, f"unknown command {cmd}")
    tx = int(tx_flags)
    if cmd == 0 and not structured:  # READ
        allowed &= ~_DF
    if not tx & _SEND_FAST_ZERO:
        allowed &= ~_FAST_ZERO
    if not tx & _SEND_FUA:
        allowed &= ~_FUA
    if req.flags & ~allowed:
        raise RequestError(Errno.EINVAL, f"flags {req.flags:#x} not valid for {Cmd(cmd).name}")
    required = _REQUIRED.get(cmd)
    if required is not None and not tx & required:
        raise RequestError(Errno.EINVAL, f"{Cmd(cmd).name} was not advertised")
    if cmd in _WRITING and tx & _READ_ONLY:
        raise RequestError(Errno.EPERM, "export is read-only")
    if cmd == Cmd.FLUSH:
        if req.offset or req.length:
            raise RequestError(Errno.EINVAL, "FLUSH with non-zero offset or length")
        return
    if cmd == Cmd.DISC:
        return
    if cmd in _PAYLOAD and req.length > max_payload:
        raise RequestError(Errno.EINVAL, f"{Cmd(cmd).name} of {req.length} bytes exceeds maximum")
    if req.offset + req.length > size:
        errno = Errno.ENOSPC if cmd in _SPACE_CONSUMING else Errno.EINVAL
        raise RequestError(errno, f"range {req.offset}+{req.length} beyond end {size}")
    if cmd == Cmd.BLOCK_STATUS:
        if not has_contexts:
            raise RequestError(Errno.EINVAL, "no metadata context selected")
        if not req.length:
            raise RequestError(Errno.EINVAL, "BLOCK_STATUS of zero length")


# -- replies ------------------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """16-byte simple reply header; READ data follows it only when error is 0."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def offset_data_header(cookie: int, offset: int, data_length: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; the caller sends ``data_length`` bytes after it."""
    flags = ReplyFlag.DONE if done else 0
    return OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie, 8 + data_length, offset
    )


def offset_hole(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return OFFSET_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12, offset, length
    )


def none_chunk(cookie: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE, cookie, 0)


def error_chunk(cookie: int, errno: int, message: str = "", offset: int | None = None) -> bytes:
    """A final ERROR (or ERROR_OFFSET when ``offset`` is given) chunk."""
    text = message.encode("utf-8")[:4096]
    payload = ERROR_HEAD.pack(errno, len(text)) + text
    kind = ReplyType.ERROR
    if offset is not None:
        payload += U64.pack(offset)
        kind = ReplyType.ERROR_OFFSET
    header = CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, kind, cookie, len(payload))
    return header + payload


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool
) -> bytes:
    """A BLOCK_STATUS chunk: context id and (length, flags) pairs."""
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    header = CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        ReplyFlag.DONE if done else 0,
        ReplyType.BLOCK_STATUS,
        cookie,
        len(body),
    )
    return header + bytes(body)
