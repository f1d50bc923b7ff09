"""Execute one validated request on an export and build its reply.

The single place where an ``OSError`` from a backend becomes an NBD error number, and where the
choice between simple, structured and extended replies is made.
"""

from __future__ import annotations

import errno as errnos
import logging
from collections.abc import Awaitable

from .backends.base import Backend, FileRange, PendingRead
from .export import Export
from .proto.consts import MAX_PAYLOAD, Cmd, CmdFlag, Errno
from .proto.messages import Negotiated, Request
from .proto.transmission import (
    block_status_chunk,
    error_chunk,
    none_chunk,
    offset_data_header,
    simple_reply,
)

Buffers = list[bytes | bytearray | memoryview | FileRange]

log = logging.getLogger("xnbdd")

# Extents per BLOCK_STATUS chunk: keeps a reply far below the maximum payload.
MAX_EXTENTS = 8192

ERRNO_MAP: dict[int, Errno] = {
    errnos.EPERM: Errno.EPERM,
    errnos.EACCES: Errno.EPERM,
    errnos.EROFS: Errno.EPERM,
    errnos.EIO: Errno.EIO,
    errnos.ENOMEM: Errno.ENOMEM,
    errnos.EINVAL: Errno.EINVAL,
    errnos.ENOSPC: Errno.ENOSPC,
    errnos.EDQUOT: Errno.ENOSPC,
    errnos.EFBIG: Errno.ENOSPC,
    errnos.EOVERFLOW: Errno.EOVERFLOW,
    errnos.ENOTSUP: Errno.ENOTSUP,
    errnos.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(err: OSError, req: Request | None = None) -> Errno:
    """Map a backend's errno to one the spec allows; anything unknown is EIO."""
    mapped = ERRNO_MAP.get(err.errno or 0, Errno.EIO)
    if mapped is Errno.ENOTSUP and not (req is not None and req.has(CmdFlag.FAST_ZERO)):
        return Errno.EIO  # ENOTSUP is reserved for FAST_ZERO requests
    return mapped


def error_reply(req: Request, negotiated: Negotiated, errno: int, message: str = "") -> Buffers:
    if negotiated.structured:
        extended = negotiated.extended
        return [error_chunk(req.cookie, errno, message, extended=extended, offset=req.offset)]
    return [simple_reply(req.cookie, errno)]


def ok_reply(req: Request, negotiated: Negotiated) -> Buffers:
    # Simple replies are allowed for every command but READ with structured replies; extended
    # headers allow no simple reply at all.
    if negotiated.extended:
        return [none_chunk(req.cookie, extended=True, offset=req.offset)]
    return [simple_reply(req.cookie)]


async def execute(
    req: Request, export: Export, negotiated: Negotiated, fields: dict[str, str] | None = None
) -> Buffers:
    """Run a request that passed ``check_request``; OSError becomes an error reply, and one
    log line with the request's context (``fields``: the client's journal fields)."""
    backend = export.backend
    try:
        return await _run(req, backend, export, negotiated)
    except OSError as err:
        return failed_reply(req, negotiated, err, fields)


async def guarded(
    req: Request, negotiated: Negotiated, fields: dict[str, str], reply: Awaitable[Buffers]
) -> Buffers:
    """What ``reply`` gives; an OSError becomes its error reply (``failed_reply``) and a bug
    EIO, logged with its traceback: a bug must cost this request, not the connection or the
    daemon."""
    try:
        return await reply
    except OSError as err:
        return failed_reply(req, negotiated, err, fields)
    except Exception:
        log.exception("internal error serving a request", extra=fields)
        return error_reply(req, negotiated, Errno.EIO, "internal error")


async def finish_read(req: Request, negotiated: Negotiated, pending: PendingRead) -> Buffers:
    """The reply to a READ its backend started at once (``StartsReads``)."""
    return read_reply(req, negotiated, await pending.result())


def failed_reply(
    req: Request, negotiated: Negotiated, err: OSError, fields: dict[str, str] | None
) -> Buffers:
    errno = nbd_errno(err, req)
    message = err.strerror or str(err)
    if errno is not Errno.ENOTSUP:  # a refused FAST_ZERO is an answer, not a failure
        command = req.command.name if req.command is not None else str(req.cmd)
        log.warning(
            "%s at offset %d length %d failed: %s",
            command,
            req.offset,
            req.length,
            message,
            extra={**(fields or {}), "XNBD_ERRNO": str(err.errno)},
        )
    return error_reply(req, negotiated, errno, message)


def read_reply(
    req: Request, negotiated: Negotiated, data: bytes | bytearray | memoryview | FileRange
) -> Buffers:
    if negotiated.structured:
        extended = negotiated.extended
        head = offset_data_header(req.cookie, req.offset, req.length, done=True, extended=extended)
        return [head, data]
    return [simple_reply(req.cookie), data]


async def _run(req: Request, backend: Backend, export: Export, negotiated: Negotiated) -> Buffers:
    cmd = req.cmd
    fua = req.has(CmdFlag.FUA)
    if cmd == Cmd.READ:
        if not req.length:
            if negotiated.structured:
                return [none_chunk(req.cookie, extended=negotiated.extended, offset=req.offset)]
            return ok_reply(req, negotiated)
        return read_reply(req, negotiated, await backend.read(req.offset, req.length))
    if cmd == Cmd.WRITE:
        if req.length:
            assert req.data is not None
            await backend.write(req.offset, req.data, fua)
        elif fua:
            await backend.flush()
        return ok_reply(req, negotiated)
    if cmd == Cmd.FLUSH:
        await backend.flush()
        return ok_reply(req, negotiated)
    if cmd == Cmd.TRIM:
        if req.length:
            await backend.trim(req.offset, req.length, fua)
        return ok_reply(req, negotiated)
    if cmd == Cmd.WRITE_ZEROES:
        if req.length:
            await backend.zero(
                req.offset,
                req.length,
                may_trim=not req.has(CmdFlag.NO_HOLE),
                fast=req.has(CmdFlag.FAST_ZERO),
                fua=fua,
            )
        return ok_reply(req, negotiated)
    if cmd == Cmd.CACHE:
        if req.length:
            await backend.cache(req.offset, req.length)
        return ok_reply(req, negotiated)
    if cmd == Cmd.BLOCK_STATUS:
        return await _block_status(req, export, negotiated)
    raise AssertionError(f"unvalidated command {cmd}")


async def _block_status(req: Request, export: Export, negotiated: Negotiated) -> Buffers:
    # Compact extents have 32-bit lengths, so a compact answer stays below the maximum payload;
    # extended ones may describe the whole (64-bit) range asked for in one request.
    extended = negotiated.extended
    length = req.length if extended else min(req.length, MAX_PAYLOAD)
    chunks: Buffers = []
    contexts = list(negotiated.meta_contexts.items())
    if req.contexts is not None:  # a BLOCK_STATUS payload chose some of them
        contexts = [(i, negotiated.meta_contexts[i]) for i in req.contexts]
    for index, (context_id, name) in enumerate(contexts):
        extents = await export.extents(name, req.offset, length)
        clipped = clip_extents(extents, length, one=req.has(CmdFlag.REQ_ONE))
        if not clipped:
            clipped = [(length, 0)]  # status 0 (allocated, data) is always a safe answer
        done = index == len(contexts) - 1
        chunk = block_status_chunk(
            req.cookie, context_id, clipped, done=done, extended=extended, offset=req.offset
        )
        chunks.append(chunk)
    return chunks


def clip_extents(
    extents: list[tuple[int, int]], length: int, *, one: bool
) -> list[tuple[int, int]]:
    """Drop empty extents, merge neighbours with equal flags, stop at ``length`` bytes."""
    out: list[tuple[int, int]] = []
    total = 0
    for ext_len, flags in extents:
        if ext_len <= 0 or total >= length:
            continue
        ext_len = min(ext_len, length - total)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + ext_len, flags)
        else:
            if len(out) >= MAX_EXTENTS:
                break
            out.append((ext_len, flags))
        total += ext_len
    if one:
        return out[:1]
    return out
