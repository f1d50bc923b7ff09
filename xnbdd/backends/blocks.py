"""The block layer under the cow overlay and the proxy cache.

Both keep a local file whose 4096-byte blocks stand in for those of a source below it (cow: the
read-only base image; proxy: the origin server), and a bitmap of the blocks the file holds
(docs/compat.md §4.2). This module is what they share: byte ranges as blocks, a byte range split
into present and absent runs, the partial edge blocks a write must fill from the source first,
and the flush order that keeps the bitmap honest after a crash (docs/decisions.md D14).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, block_span, nblocks_for
from xnbdd.proto.consts import State


def block_bytes(first: int, stop: int, size: int) -> tuple[int, int]:
    """The bytes [start, end) of blocks [first, stop) in an export of ``size`` bytes (the last
    block may be partial)."""
    return first * BLOCK_SIZE, min(stop * BLOCK_SIZE, size)


def whole_blocks(offset: int, length: int, size: int) -> tuple[int, int]:
    """Blocks [first, stop) that the byte range covers entirely; a range reaching the end of the
    export covers its partial last block. Empty (first >= stop) when there is none."""
    end = offset + length
    return -(-offset // BLOCK_SIZE), nblocks_for(end) if end == size else end // BLOCK_SIZE


def zero_blocks(
    offset: int, extents: list[tuple[int, int]], size: int
) -> tuple[list[tuple[int, int]], int]:
    """The block runs [a, b) that base:allocation ``extents`` (length, flags) starting at byte
    ``offset`` call zeros (NBD_STATE_ZERO; a block shared with data is data), and the byte where
    the extents end."""
    zeros: list[tuple[int, int]] = []
    pos = offset
    for ext_len, flags in extents:
        if flags & State.ZERO:
            a, b = whole_blocks(pos, ext_len, size)
            if b > a and zeros and zeros[-1][1] == a:
                zeros[-1] = (zeros[-1][0], b)
            elif b > a:
                zeros.append((a, b))
        pos += ext_len
    return zeros, pos


def present_runs(
    bitmap: Bitmap, offset: int, length: int, limit: int | None = None
) -> list[tuple[int, int, bool]]:
    """(start, end, present) byte runs that cover [offset, offset + length) in order, or the
    first ``limit`` of them; ``present``: the bitmap has those blocks."""
    first, stop = block_span(offset, length)
    end = offset + length
    out: list[tuple[int, int, bool]] = []

    def add(a: int, b: int, present: bool) -> None:
        out.append((max(a * BLOCK_SIZE, offset), min(b * BLOCK_SIZE, end), present))

    pos = first
    for a, b in bitmap.runs(first, stop, True):
        if a > pos:
            add(pos, a, False)
        add(a, b, True)
        pos = b
        if limit is not None and len(out) >= limit:
            return out[:limit]
    if pos < stop:
        add(pos, stop, False)
    return out if limit is None else out[:limit]


def missing_edges(bitmap: Bitmap, offset: int, length: int, size: int) -> list[tuple[int, int]]:
    """Block runs [first, stop) a write of the byte range covers only in part and the bitmap
    lacks: its head and tail blocks (one run when they are neighbours). A tail that ends at the
    end of the export is covered whole."""
    end = offset + length
    edges: list[int] = []
    if offset % BLOCK_SIZE:
        edges.append(offset // BLOCK_SIZE)
    if end % BLOCK_SIZE and end < size and end // BLOCK_SIZE not in edges:
        edges.append(end // BLOCK_SIZE)
    runs: list[tuple[int, int]] = []
    for block in edges:
        if bitmap.test(block):
            continue
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


async def fill_edges(
    bitmap: Bitmap,
    offset: int,
    length: int,
    size: int,
    fill: Callable[[int, int], Awaitable[object]],
) -> None:
    """Read-modify-write, first half: before a write of the byte range lands in the local file,
    ``fill(first, stop)`` brings each missing partial edge run in from the source, so the
    blocks the write then marks present hold valid bytes around it. The caller holds the range
    lock over the write's blocks."""
    for first, stop in missing_edges(bitmap, offset, length, size):
        await fill(first, stop)


async def flush_data_then_bitmap(flush_data: Callable[[], Awaitable[None]], bitmap: Bitmap) -> None:
    """Make the local file durable, then the bits that cover it (docs/decisions.md D14).

    The bits are captured before the data sync: a bit set while the sync runs may cover a write
    that sync missed, so it waits for the next flush. After a crash every set bit covers durable
    data; at worst a block is fetched or copied up again.
    """
    pending = bitmap.capture()
    await flush_data()
    if pending is not None:
        await trio.to_thread.run_sync(bitmap.write_back, pending)
