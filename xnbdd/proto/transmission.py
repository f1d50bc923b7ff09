"""Transmission phase: the request layouts, request validation and reply encoding.

Rules kept here (proto.md "Transmission", docs/protocol-rules.md rules 25-29):
- unknown commands and flags, out-of-range READ/TRIM/CACHE/BLOCK_STATUS -> EINVAL; WRITE and
  WRITE_ZEROES past the end -> ENOSPC; writes on a read-only export -> EPERM;
- range checks use Python integers, so offset + length cannot wrap;
- extended headers (docs/data-path.md): 64-bit effect lengths for the commands without a
  payload; a WRITE's length is its payload's, with NBD_CMD_FLAG_PAYLOAD_LEN or without it (the
  spec wants the flag, qemu 10 does not send it); a payload on any other command is EINVAL,
  except BLOCK_STATUS's context filter when NBD_FLAG_BLOCK_STATUS_PAYLOAD was advertised; a READ
  above the maximum payload is EOVERFLOW (the client may retry smaller); every reply is an
  extended chunk that echoes the request's offset, and extents are BLOCK_STATUS_EXT.

Framing (where a request ends, how a refused payload is dropped to stay in step, when a bad
magic or an undrainable payload closes the connection) is done by the data plane
(``xnbdd/dataplane.py``) straight on its receive buffer, without a copy; ``REQUEST``,
``EXTENDED_REQUEST`` and ``DRAIN_LIMIT`` are its numbers.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterable
from dataclasses import replace

from .consts import (
    EXTENDED_REPLY_MAGIC,
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
from .wire import (
    BLOCK_STATUS_EXT_HEAD,
    CHUNK,
    ERROR_HEAD,
    EXTENDED_CHUNK,
    EXTENDED_OFFSET_DATA,
    EXTENT,
    EXTENT_EXT,
    OFFSET_DATA,
    OFFSET_HOLE,
    SIMPLE_REPLY,
    U32,
    U64,
)

# Payloads above the maximum are drained up to this size (the client gets EINVAL and stays in
# step); beyond it the request is treated as denial of service and the connection is closed.
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
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_DF = int(CmdFlag.DF)
_FUA = int(CmdFlag.FUA)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_ALLOWED = {int(cmd): int(flags) for cmd, flags in ALLOWED_FLAGS.items()}
_REQUIRED = {int(cmd): int(flag) for cmd, flag in REQUIRED_TX_FLAG.items()}
_WRITING = frozenset(int(c) for c in WRITING)
_SPACE_CONSUMING = frozenset(int(c) for c in SPACE_CONSUMING)
_PAYLOAD = frozenset({int(Cmd.READ), _WRITE})
_SEND_FAST_ZERO, _SEND_FUA = int(TxFlag.SEND_FAST_ZERO), int(TxFlag.SEND_FUA)
_STATUS_PAYLOAD = int(TxFlag.BLOCK_STATUS_PAYLOAD)
_READ_ONLY = int(TxFlag.READ_ONLY)


def check_request(
    req: Request,
    *,
    size: int,
    tx_flags: TxFlag,
    structured: bool,
    has_contexts: bool,
    max_payload: int = MAX_PAYLOAD,
    extended: bool = False,
    context_ids: Container[int] = (),
) -> Request:
    """The request to execute, or RequestError with the spec's errno if it must be refused.

    With extended headers a BLOCK_STATUS payload (``context_ids``: the selected contexts) comes
    back decoded: its effect length as ``length``, the ids it asks for as ``contexts``.
    """
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
    if extended and (cmd == _WRITE or (cmd == _BLOCK_STATUS and tx & _STATUS_PAYLOAD)):
        allowed |= _PAYLOAD_LEN
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
        return req
    if cmd == Cmd.DISC:
        return req
    if cmd in _PAYLOAD and req.length > max_payload:
        errno = Errno.EOVERFLOW if extended and cmd != _WRITE else Errno.EINVAL
        raise RequestError(errno, f"{Cmd(cmd).name} of {req.length} bytes exceeds maximum")
    if cmd == _BLOCK_STATUS and req.flags & _PAYLOAD_LEN:
        req = _status_filter(req, context_ids)
    if req.offset + req.length > size:
        errno = Errno.ENOSPC if cmd in _SPACE_CONSUMING else Errno.EINVAL
        raise RequestError(errno, f"range {req.offset}+{req.length} beyond end {size}")
    if cmd == _BLOCK_STATUS:
        if not has_contexts:
            raise RequestError(Errno.EINVAL, "no metadata context selected")
        if not req.length:
            raise RequestError(Errno.EINVAL, "BLOCK_STATUS of zero length")
    return req


def _status_filter(req: Request, context_ids: Container[int]) -> Request:
    """Decode a BLOCK_STATUS payload: 64-bit effect length, then the context ids wanted."""
    data = req.data or b""
    if len(data) < U64.size + U32.size or (len(data) - U64.size) % U32.size:
        raise RequestError(Errno.EINVAL, f"BLOCK_STATUS payload of {len(data)} bytes")
    (length,) = U64.unpack_from(data)
    count = (len(data) - U64.size) // U32.size
    ids = struct.unpack_from(f"!{count}I", data, U64.size)
    if len(set(ids)) != count:
        raise RequestError(Errno.EINVAL, "BLOCK_STATUS payload repeats a context id")
    for context_id in ids:
        if context_id not in context_ids:
            raise RequestError(Errno.EINVAL, f"context id {context_id} was not selected")
    return replace(req, length=length, data=None, contexts=ids)


# -- replies ------------------------------------------------------------------------------------
#
# Builders of structured chunks take ``extended``: then the header is the 32-byte extended one,
# which echoes the request's ``offset`` (a READ is never split, so its chunk starts there too).


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """16-byte simple reply header; READ data follows it only when error is 0."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(
    flags: int, kind: int, cookie: int, length: int, *, extended: bool = False, offset: int = 0
) -> bytes:
    if extended:
        return EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, length)
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def offset_data_header(
    cookie: int, offset: int, data_length: int, *, done: bool, extended: bool = False
) -> bytes:
    """Header of an OFFSET_DATA chunk; the caller sends ``data_length`` bytes after it."""
    flags = ReplyFlag.DONE if done else 0
    kind, length = ReplyType.OFFSET_DATA, 8 + data_length
    if extended:
        magic = EXTENDED_REPLY_MAGIC
        return EXTENDED_OFFSET_DATA.pack(magic, flags, kind, cookie, offset, length, offset)
    return OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length, offset)


def offset_hole(
    cookie: int, offset: int, length: int, *, done: bool, extended: bool = False
) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    head = chunk_header(
        flags, ReplyType.OFFSET_HOLE, cookie, OFFSET_HOLE.size, extended=extended, offset=offset
    )
    return head + OFFSET_HOLE.pack(offset, length)


def none_chunk(cookie: int, *, extended: bool = False, offset: int = 0) -> bytes:
    return chunk_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0, extended=extended, offset=offset)


def error_chunk(
    cookie: int,
    errno: int,
    message: str = "",
    error_offset: int | None = None,
    *,
    extended: bool = False,
    offset: int = 0,
) -> bytes:
    """A final ERROR (or ERROR_OFFSET when ``error_offset`` is given) chunk."""
    text = message.encode("utf-8")[:4096]
    payload = ERROR_HEAD.pack(errno, len(text)) + text
    kind = ReplyType.ERROR
    if error_offset is not None:
        payload += U64.pack(error_offset)
        kind = ReplyType.ERROR_OFFSET
    head = chunk_header(
        ReplyFlag.DONE, kind, cookie, len(payload), extended=extended, offset=offset
    )
    return head + payload


def block_status_chunk(
    cookie: int,
    context_id: int,
    extents: Iterable[tuple[int, int]],
    *,
    done: bool,
    extended: bool = False,
    offset: int = 0,
) -> bytes:
    """A status chunk for one context: BLOCK_STATUS with (32-bit length, flags) pairs, or
    BLOCK_STATUS_EXT with a count and 64-bit pairs when ``extended``."""
    flags = ReplyFlag.DONE if done else 0
    if extended:
        pairs = list(extents)
        body = bytearray(BLOCK_STATUS_EXT_HEAD.pack(context_id, len(pairs)))
        for length, status in pairs:
            body += EXTENT_EXT.pack(length, status)
        kind = ReplyType.BLOCK_STATUS_EXT
    else:
        body = bytearray(U32.pack(context_id))
        for length, status in extents:
            body += EXTENT.pack(length, status)
        kind = ReplyType.BLOCK_STATUS
    head = chunk_header(flags, kind, cookie, len(body), extended=extended, offset=offset)
    return head + bytes(body)
