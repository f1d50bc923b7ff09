"""Transmission phase: request framing, request validation and reply encoding.

Rules kept here (proto.md "Transmission", nbd-protocol.md §10):
- a bad request magic means framing is lost: ProtocolError, the connection closes;
- the payload of every WRITE is taken off the stream even when the WRITE is refused, so the next
  request is read in step; oversized payloads are discarded piecewise, never buffered whole;
- unknown commands and flags, out-of-range READ/TRIM/CACHE/BLOCK_STATUS -> EINVAL; WRITE and
  WRITE_ZEROES past the end -> ENOSPC; writes on a read-only export -> EPERM;
- range checks use Python integers, so offset + length cannot wrap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from .consts import (
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .errors import ProtocolError, RequestError
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


class RequestDecoder:
    """Turns the client's byte stream into ``Request`` objects.

    Large WRITE payloads need not pass through the stream buffer: ``direct_payload`` hands the
    caller the payload's own buffer to receive into, and ``complete_payload`` finishes it.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._discard = 0  # bytes of a refused oversized WRITE payload still to drop
        self._direct: tuple[Request, bytearray] | None = None
        self.max_payload = max_payload

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into requests."""
        return len(self._buf) - self._pos

    def _header(self) -> tuple[int, int, int, int, int] | None:
        if self._discard or self._direct is not None:
            return None
        if len(self._buf) - self._pos < REQUEST.size:
            return None
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        return flags, cmd, cookie, offset, length

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed."""
        header = self._header()
        if header is None:
            return None
        flags, cmd, cookie, offset, length = header
        if cmd != _WRITE:
            self._consume(REQUEST.size)
            return Request(cookie, cmd, flags, offset, length)
        if length > self.max_payload:
            if length > DRAIN_LIMIT:
                raise ProtocolError(f"WRITE of {length} bytes refused as denial of service")
            self._consume(REQUEST.size)
            in_buffer = min(length, len(self._buf) - self._pos)
            self._consume(in_buffer)
            self._discard = length - in_buffer
            return Request(cookie, cmd, flags, offset, length, None)
        start = self._pos + REQUEST.size
        if len(self._buf) < start + length:
            return None
        with memoryview(self._buf) as view:
            data = bytes(view[start : start + length])  # one copy, not two
        self._consume(REQUEST.size + length)
        return Request(cookie, cmd, flags, offset, length, data)

    def direct_payload(
        self, threshold: int, allocate: Callable[[int], bytearray] = bytearray
    ) -> memoryview | None:
        """If the next request is a WRITE of at least ``threshold`` bytes whose payload has not
        all arrived, move it into a buffer of its own (from ``allocate``, which may recycle
        one) and return the part still missing, for the caller to receive into; then call
        ``complete_payload``. Otherwise None."""
        header = self._header()
        if header is None:
            return None
        flags, cmd, cookie, offset, length = header
        have = len(self._buf) - self._pos - REQUEST.size
        if cmd != _WRITE or length > self.max_payload or length < threshold or have >= length:
            return None
        payload = allocate(length)
        payload[:have] = memoryview(self._buf)[self._pos + REQUEST.size :]
        self._consume(REQUEST.size + have)
        self._direct = (Request(cookie, cmd, flags, offset, length, None), payload)
        return memoryview(payload)[have:]

    def complete_payload(self) -> Request:
        """The WRITE whose missing payload the caller has received into ``direct_payload``."""
        assert self._direct is not None, "no direct payload in progress"
        head, payload = self._direct
        self._direct = None
        return Request(head.cookie, head.cmd, head.flags, head.offset, head.length, payload)

    def _consume(self, count: int) -> None:
        self._pos += count
        # Compact only when the dead prefix dominates, so consuming stays amortised O(1).
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0


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
