"""The block layer shared by cow and proxy: spans, present runs, edge fills, flush order."""

from __future__ import annotations

from pathlib import Path

from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap
from xnbdd.backends.blocks import (
    block_bytes,
    fill_edges,
    flush_data_then_bitmap,
    missing_edges,
    present_runs,
    whole_blocks,
    zero_blocks,
)
from xnbdd.proto.consts import State

B = BLOCK_SIZE


def test_block_bytes_clips_the_last_partial_block() -> None:
    assert block_bytes(0, 2, 10 * B) == (0, 2 * B)
    assert block_bytes(2, 3, 2 * B + 100) == (2 * B, 2 * B + 100)


def test_whole_blocks_counts_a_partial_last_block_at_the_end_only() -> None:
    size = 4 * B + 100
    assert whole_blocks(1, 2 * B, size) == (1, 2)  # blocks 0 and 2 only in part
    assert whole_blocks(B, 10, size) == (1, 1)  # none
    assert whole_blocks(3 * B, B + 100, size) == (3, 5)  # reaches the end: block 4 is whole
    assert whole_blocks(3 * B, B + 50, size) == (3, 4)


def test_present_runs_split_a_range_by_the_bitmap() -> None:
    bitmap = Bitmap.in_memory(8)
    bitmap.set_range(2, 4)
    bitmap.set_range(5, 6)
    runs = present_runs(bitmap, 100, 7 * B)
    assert runs == [
        (100, 2 * B, False),
        (2 * B, 4 * B, True),
        (4 * B, 5 * B, False),
        (5 * B, 6 * B, True),
        (6 * B, 7 * B + 100, False),
    ]
    assert present_runs(bitmap, 100, 7 * B, limit=2) == runs[:2]
    assert present_runs(bitmap, 2 * B + 1, 10) == [(2 * B + 1, 2 * B + 11, True)]


def test_missing_edges_are_the_absent_partial_head_and_tail() -> None:
    bitmap = Bitmap.in_memory(8)
    size = 8 * B
    assert missing_edges(bitmap, B, 2 * B, size) == []  # aligned: nothing to fill
    assert missing_edges(bitmap, B + 1, 3 * B, size) == [(1, 2), (4, 5)]
    assert missing_edges(bitmap, B + 1, B, size) == [(1, 3)]  # neighbours: one run
    assert missing_edges(bitmap, 10, 20, size) == [(0, 1)]  # head and tail in one block
    assert missing_edges(bitmap, 7 * B + 1, B - 1, size) == [(7, 8)]  # tail at the end: whole
    assert missing_edges(bitmap, 6 * B, B + 5, 7 * B + 5) == []
    bitmap.set_range(1, 2)
    assert missing_edges(bitmap, B + 1, 3 * B, size) == [(4, 5)]


async def test_fill_edges_calls_fill_for_each_missing_run() -> None:
    bitmap = Bitmap.in_memory(8)
    bitmap.set_range(4, 5)
    filled: list[tuple[int, int]] = []

    async def fill(first: int, stop: int) -> None:
        filled.append((first, stop))

    await fill_edges(bitmap, B + 1, 3 * B, 8 * B, fill)
    assert filled == [(1, 2)]


async def test_flush_persists_only_bits_captured_before_the_data_sync(tmp_path: Path) -> None:
    path = str(tmp_path / "bm")
    bitmap = Bitmap.open(path, 64)
    bitmap.set_range(0, 1)
    synced: list[bytes] = []

    async def flush_data() -> None:
        synced.append(Path(path).read_bytes())
        bitmap.set_range(1, 2)  # a bit set while the data sync runs waits for the next flush

    await flush_data_then_bitmap(flush_data, bitmap)
    assert synced == [bytes(8)]  # the bit reached the file only after the data was durable
    assert Path(path).read_bytes()[0] == 0b01
    await flush_data_then_bitmap(flush_data, bitmap)
    assert Path(path).read_bytes()[0] == 0b11
    bitmap.close()


def test_zero_blocks_are_whole_blocks_the_origin_calls_zero() -> None:
    size = 10 * B + 100  # a partial last block
    extents = [
        (B + 10, 0),  # data, ending inside block 1
        (3 * B, State.ZERO | State.HOLE),  # zeros over blocks 2..3 whole, 1 and 4 shared
        (B - 10, State.ZERO),  # the rest of block 4: no extent covers block 4 whole
        (2 * B, State.HOLE),  # a hole that is not said to read as zeros: data for us
        (2 * B, State.ZERO),  # blocks 7..8
        (B + 100, State.ZERO),  # block 9 and the partial last block
    ]
    zeros, end = zero_blocks(0, extents, size)
    assert end == size
    # block 4 is fetched (safe: each extent covers only part of it); runs that touch merge, and
    # the partial last block counts (the range reaches the end of the export)
    assert zeros == [(2, 4), (7, 11)]
