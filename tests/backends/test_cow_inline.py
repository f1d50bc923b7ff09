"""CowBackend's InlineIO, the connection threads' side: writes to absent blocks (whole blocks
and copy-ups) done at once under the cross-process lock taken without waiting, declined while
anyone else holds their bitmap bytes, and raced from several threads; reads from the right
layer. Over real files on tmpfs, where the overlay never makes a write wait."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from xnbdd.backends.base import FileRange
from xnbdd.backends.bitmap import BLOCK_SIZE
from xnbdd.backends.cow import CowBackend

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


def open_cow(directory: Path, size: int, fill: bytes = b"\xbb") -> CowBackend:
    base = directory / "disk.img"
    base.write_bytes((fill * size)[:size])
    return CowBackend.open(str(base))


def present(cow: CowBackend) -> list[tuple[int, int]]:
    return list(cow.bitmap.runs(0, cow.bitmap.nblocks, True))


def inline_read(cow: CowBackend, offset: int, length: int) -> bytes:
    got = cow.try_read(offset, length)
    assert got is not None  # tmpfs: reads never wait
    if isinstance(got, FileRange):
        return os.pread(got.fd, got.length, got.offset)
    return bytes(got)


def test_whole_blocks_absent_from_the_overlay_are_written_inline(shm: Path) -> None:
    """A write that covers its blocks whole needs no copy-up: the thread writes it and sets the
    bits (before: every write to an absent block waited for the event loop)."""
    cow = open_cow(shm, 4 * MiB)
    try:
        assert cow.try_write(MiB, b"\x01" * MiB)
        assert cow.try_write(8 * KiB, b"\x02" * BLOCK_SIZE)
        assert present(cow) == [(2, 3), (256, 512)]
        assert inline_read(cow, MiB - 4, 8) == b"\xbb" * 4 + b"\x01" * 4
        assert inline_read(cow, 8 * KiB, BLOCK_SIZE) == b"\x02" * BLOCK_SIZE
        assert trio.run(cow.read, 0, 4 * MiB) == (
            b"\xbb" * 8 * KiB
            + b"\x02" * BLOCK_SIZE
            + b"\xbb" * (MiB - 12 * KiB)
            + b"\x01" * MiB
            + b"\xbb" * 2 * MiB
        )
    finally:
        trio.run(cow.close)
    assert (shm / "disk.img").read_bytes() == b"\xbb" * 4 * MiB  # the base never changes


def test_a_partial_write_to_absent_blocks_copies_them_up_inline(shm: Path) -> None:
    size = 64 * KiB + 100  # a partial last block too
    cow = open_cow(shm, size)
    try:
        assert cow.try_write(BLOCK_SIZE + 100, b"hello")  # inside one block
        assert cow.try_write(4 * BLOCK_SIZE - 3, b"abcdef")  # across two blocks
        assert cow.try_write(size - 50, b"tail")  # in the partial last block
        assert present(cow) == [(1, 2), (3, 5), (16, 17)]
        model = bytearray(b"\xbb" * size)
        model[BLOCK_SIZE + 100 : BLOCK_SIZE + 105] = b"hello"
        model[4 * BLOCK_SIZE - 3 : 4 * BLOCK_SIZE + 3] = b"abcdef"
        model[size - 50 : size - 46] = b"tail"
        assert trio.run(cow.read, 0, size) == model
        for offset in range(0, size, BLOCK_SIZE):  # block by block: each from its layer
            length = min(BLOCK_SIZE, size - offset)
            assert inline_read(cow, offset, length) == model[offset : offset + length]
    finally:
        trio.run(cow.close)


@pytest.mark.parametrize("holder", ["event loop", "other process"])
def test_an_inline_write_declines_while_its_bitmap_bytes_are_held(shm: Path, holder: str) -> None:
    """Held by a copy-up on the event loop (``_exclusive``: the description every task of the
    process shares) or by another process (its own description): the thread must not write
    under it. Declining changes nothing; the blocks of other bitmap bytes are free."""
    cow = open_cow(shm, 256 * KiB)
    other = None
    try:
        lock = cow.bitmap
        if holder == "other process":  # a worker's view of the overlay: its own description
            other = CowBackend.attach(
                os.dup(cow.base.fd),
                str(shm / "disk.img"),
                os.dup(cow.overlay.fd),
                cow.overlay_path,
                os.dup(cow.bitmap.fd),
            )
            lock = other.bitmap
        lock.lock(8, 16)  # one bitmap byte: blocks 8-15
        try:
            assert not cow.try_write(9 * BLOCK_SIZE, b"\x01" * BLOCK_SIZE)
            assert not cow.try_write(15 * BLOCK_SIZE + 10, b"x")  # a copy-up
            assert not cow.try_write(7 * BLOCK_SIZE, b"\x01" * 2 * BLOCK_SIZE)  # partly held
            assert present(cow) == []
            assert trio.run(cow.read, 7 * BLOCK_SIZE, 9 * BLOCK_SIZE) == b"\xbb" * 9 * BLOCK_SIZE
            assert cow.try_write(16 * BLOCK_SIZE, b"\x02" * BLOCK_SIZE)  # the next byte's
            assert present(cow) == [(16, 17)]
        finally:
            lock.unlock(8, 16)
        assert cow.try_write(9 * BLOCK_SIZE, b"\x01" * BLOCK_SIZE)
        assert present(cow) == [(9, 10), (16, 17)]
    finally:
        if other is not None:
            trio.run(other.close)
        trio.run(cow.close)


def test_an_event_loop_write_waits_for_the_blocks_a_thread_holds(shm: Path) -> None:
    """The other way round: while a connection's thread holds blocks, ``write`` (which takes
    the process's own description) waits for them instead of copying stale base bytes."""
    cow = open_cow(shm, 256 * KiB)
    try:
        held = cow.bitmap.try_lock_apart(0, 8)
        assert held is not None

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cow.write, 100, b"loop", False)
                await trio.testing.wait_all_tasks_blocked()  # it waits for the lock in a thread
                assert present(cow) == [], "wrote while a thread held the blocks"
                cow.bitmap.unlock_apart(held, 0, 8)

        trio.run(main)
        assert present(cow) == [(0, 1)]
        assert trio.run(cow.read, 96, 12) == b"\xbb" * 4 + b"loop" + b"\xbb" * 4
    finally:
        trio.run(cow.close)


def test_threads_writing_parts_of_the_same_absent_blocks_lose_nothing(shm: Path) -> None:
    """Connections' threads race for the same absent blocks: each writes every THREADS-th
    512-byte sector of every block, so each write copies up a block another thread is writing
    too. Without the lock a copy-up lands on another thread's fresh sector."""
    threads, sector, blocks = 4, 512, 512
    cow = open_cow(shm, blocks * BLOCK_SIZE, fill=b"\xee")
    declined = [0] * threads
    failed: list[str] = []

    def writer(me: int) -> None:
        for block in range(blocks):
            for s in range(me, BLOCK_SIZE // sector, threads):
                data = bytes([me + 1, block % 251]) * (sector // 2)
                for _ in range(100_000):  # held by another thread for a moment: try again
                    if cow.try_write(block * BLOCK_SIZE + s * sector, data):
                        break
                    declined[me] += 1
                else:
                    failed.append(f"thread {me} was refused block {block} for good")
                    return

    try:
        workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not failed
        assert cow.bitmap.count() == blocks
        data = trio.run(cow.read, 0, blocks * BLOCK_SIZE)
        lost = [
            (block, s)
            for block in range(blocks)
            for s in range(BLOCK_SIZE // sector)
            if data[(start := block * BLOCK_SIZE + s * sector) : start + sector]
            != bytes([s % threads + 1, block % 251]) * (sector // 2)
        ]
        assert not lost, f"{len(lost)} sectors lost, first {lost[:4]} (declined {declined})"
    finally:
        trio.run(cow.close)


def test_inline_and_event_loop_writes_match_a_model(shm: Path) -> None:
    """Random writes, inline where the thread can and on the event loop otherwise, interleaved
    with trims and zeroes; every read path agrees with a plain byte model."""
    size = 37 * BLOCK_SIZE + 700
    rng = random.Random(11)
    base = rng.randbytes(size)
    (shm / "disk.img").write_bytes(base)
    cow = CowBackend.open(str(shm / "disk.img"))
    model = bytearray(base)

    async def main() -> None:
        for _ in range(300):
            offset = rng.randrange(size)
            length = 1 + rng.randrange(min(size - offset, 3 * BLOCK_SIZE))
            kind = rng.choice(["inline", "inline", "loop", "zero"])
            if kind == "zero":
                await cow.zero(offset, length, may_trim=True, fast=False, fua=False)
                model[offset : offset + length] = bytes(length)
                continue
            data = rng.randbytes(length)
            if kind == "loop" or not cow.try_write(offset, data):
                await cow.write(offset, data, fua=False)
            model[offset : offset + length] = data
        assert await cow.read(0, size) == model

    try:
        trio.run(main)
        for offset in range(0, size, 1000):
            length = min(3000, size - offset)
            assert inline_read(cow, offset, length) == model[offset : offset + length]
    finally:
        trio.run(cow.close)
    assert (shm / "disk.img").read_bytes() == base
