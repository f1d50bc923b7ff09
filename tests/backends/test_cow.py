"""CowBackend over real files: base untouched, overlay naming and lifetime, merged reads, zeros,
block status, concurrent copy-up, stale-overlay cleanup after a real kill -9."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, nblocks_for
from xnbdd.backends.cow import CowBackend

KiB = 1024
MiB = 1 << 20


def make_base(path: Path, size: int, fill: bytes | None = None) -> str:
    """A base image: ``fill`` repeated, or random data, written over its whole size."""
    data = (fill * size)[:size] if fill is not None else random.Random(7).randbytes(size)
    path.write_bytes(data)
    return str(path)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def test_overlay_files_are_named_like_xnbd_and_removed(tmp_path: Path) -> None:
    base = make_base(tmp_path / "disk.img", MiB + 1000)
    before = digest(base)
    first = CowBackend.open(base)
    second = CowBackend.open(base)
    assert first.overlay_path == f"{base}.cow0.layer1"
    assert first.bitmap_path == f"{base}.cow0.layer1.bm"
    assert second.overlay_path == f"{base}.cow1.layer1"
    for path in (first.overlay_path, first.bitmap_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.getsize(first.overlay_path) == MiB + 1000
    assert os.path.getsize(first.bitmap_path) == 8 * -(-nblocks_for(MiB + 1000) // 64)
    assert first.size == MiB + 1000 and first.capabilities.multi_conn
    await first.write(0, b"x" * 5000, fua=True)
    await first.close()
    await first.close()  # idempotent
    assert not os.path.exists(first.overlay_path) and not os.path.exists(first.bitmap_path)
    assert os.path.exists(second.overlay_path)
    await second.close()
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]
    assert digest(base) == before


async def test_cow_dir(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "overlays").mkdir()
    base = make_base(tmp_path / "images" / "disk.img", 64 * KiB)
    backend = CowBackend.open(base, cow_dir=str(tmp_path / "overlays"))
    assert backend.overlay_path == str(tmp_path / "overlays" / "disk.img.cow0.layer1")
    await backend.close()
    assert os.listdir(tmp_path / "overlays") == []


async def test_missing_base(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CowBackend.open(str(tmp_path / "missing.img"))
    assert os.listdir(tmp_path) == []


async def _check_against_model(
    tmp_path: Path, size: int, ops: list[tuple[str, int, int]], seed: int
) -> None:
    base = make_base(tmp_path / "disk.img", size)
    before = digest(base)
    model = bytearray(Path(base).read_bytes())
    rng = random.Random(seed)
    backend = CowBackend.open(base)
    try:
        for kind, a, b in ops:
            offset = a % size
            length = 1 + b % (size - offset)
            if kind == "write":
                data = rng.randbytes(length)
                await backend.write(offset, data, fua=False)
                model[offset : offset + length] = data
            else:
                if kind == "trim":
                    await backend.trim(offset, length, fua=False)
                else:
                    await backend.zero(
                        offset, length, may_trim=kind == "zero", fast=False, fua=False
                    )
                model[offset : offset + length] = bytes(length)
        assert await backend.read(0, size) == model
        assert await backend.read(1, size - 2) == model[1:-1]
        # block status never calls zeros data where the model has non-zero bytes
        pos = 0
        for extent in await backend.block_status(0, size):
            assert extent.length > 0
            if extent.zero:
                assert not any(model[pos : pos + extent.length])
            pos += extent.length
        assert 0 < pos <= size
        await backend.flush()
    finally:
        await backend.close()
    assert digest(base) == before


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.sampled_from([BLOCK_SIZE, 5 * BLOCK_SIZE + 123, 64 * KiB]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "trim", "zero", "zero-no-hole"]),
            st.integers(0, 1 << 20),
            st.integers(0, 1 << 20),
        ),
        max_size=12,
    ),
    seed=st.integers(0, 1000),
)
def test_reads_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, size: int, ops: list[tuple[str, int, int]], seed: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("cow")
    trio.run(_check_against_model, tmp_path, size, ops, seed)


async def test_zeroed_blocks_read_zeros_over_base_data(tmp_path: Path) -> None:
    size = 256 * KiB
    base_path = tmp_path / "disk.img"
    with open(base_path, "wb") as f:  # data in the first 64 KiB, a hole after it
        f.write(b"\xbb" * (64 * KiB))
        f.truncate(size)
    backend = CowBackend.open(str(base_path))
    assert [(e.length, e.hole) for e in await backend.block_status(0, size)] == [
        (64 * KiB, False),
        (192 * KiB, True),
    ]
    await backend.zero(4 * KiB, 4 * KiB, may_trim=True, fast=True, fua=False)
    await backend.trim(16 * KiB + 100, 8 * KiB, fua=False)
    await backend.write(128 * KiB, b"\x01" * 4096, fua=False)
    assert await backend.read(4 * KiB, 4 * KiB) == bytes(4 * KiB)
    got = await backend.read(16 * KiB, 12 * KiB)
    assert got == b"\xbb" * 100 + bytes(8 * KiB) + b"\xbb" * (4 * KiB - 100)
    extents = [(e.length, e.hole, e.zero) for e in await backend.block_status(0, size)]
    assert extents[:2] == [(4 * KiB, False, False), (4 * KiB, True, True)]
    assert (4 * KiB, False, False) in extents  # the block written at 128 KiB
    assert sum(e[0] for e in extents) == size
    await backend.close()
    assert Path(base_path).read_bytes()[: 64 * KiB] == b"\xbb" * (64 * KiB)


async def test_concurrent_partial_writes_to_one_block_lose_nothing(tmp_path: Path) -> None:
    base = make_base(tmp_path / "disk.img", 64 * KiB, fill=b"\xbb")
    backend = CowBackend.open(base)
    offsets = list(range(0, BLOCK_SIZE, 37))
    async with trio.open_nursery() as nursery:
        for i, offset in enumerate(offsets):
            nursery.start_soon(backend.write, 8 * KiB + offset, bytes([i % 250 + 1]), False)
    block = await backend.read(8 * KiB, BLOCK_SIZE)
    for i, offset in enumerate(offsets):
        assert block[offset] == i % 250 + 1
    assert all(block[o] == 0xBB for o in range(BLOCK_SIZE) if o % 37)
    await backend.close()


async def test_copy_up_never_overwrites_a_full_block_write(tmp_path: Path) -> None:
    base = make_base(tmp_path / "disk.img", 64 * KiB, fill=b"\xbb")
    backend = CowBackend.open(base)
    async with trio.open_nursery() as nursery:
        for offset in range(1, BLOCK_SIZE, 97):
            nursery.start_soon(backend.write, 4 * KiB + offset, b"\x22", False)
        nursery.start_soon(backend.write, 4 * KiB, b"\x11" * BLOCK_SIZE, False)
    block = await backend.read(4 * KiB, BLOCK_SIZE)
    assert 0xBB not in block  # every byte comes from one of the writes, none from the base
    await backend.close()


async def test_flush_persists_the_bitmap_after_the_data(tmp_path: Path) -> None:
    base = make_base(tmp_path / "disk.img", 64 * KiB)
    backend = CowBackend.open(base)
    await backend.write(4 * KiB + 10, b"abc", fua=False)
    await backend.flush()
    on_disk = Bitmap.open(backend.bitmap_path, backend.bitmap.nblocks, readonly=True)
    assert list(on_disk.runs(0, on_disk.nblocks, True)) == [(1, 2)]
    on_disk.close()
    with open(backend.overlay_path, "rb") as f:
        f.seek(4 * KiB + 10)
        assert f.read(3) == b"abc"
    await backend.close()


async def test_snapshot_source_reads_what_clients_see(tmp_path: Path) -> None:
    size = 5 * BLOCK_SIZE + 123
    base = make_base(tmp_path / "disk.img", size)
    backend = CowBackend.open(base)
    await backend.write(100, b"\x01" * 5000, fua=False)
    await backend.zero(3 * BLOCK_SIZE, BLOCK_SIZE, may_trim=True, fast=False, fua=False)
    seen = bytearray(size)
    for start, stop in backend.snapshot_runs(0, size):
        backend.snapshot_read(memoryview(seen)[start:stop], start)
    assert seen == await backend.read(0, size)
    await backend.close()


CHILD = """
import sys, time, trio
sys.path.insert(0, {root!r})
from xnbdd.backends.cow import CowBackend

async def main():
    backend = CowBackend.open({base!r})
    await backend.write(0, b"child", fua=True)
    print(backend.overlay_path, flush=True)
    time.sleep(600)

trio.run(main)
"""


def spawn_child(base: str) -> tuple[subprocess.Popen[str], str]:
    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=root, base=base)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


async def test_stale_overlay_of_a_killed_instance_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = make_base(tmp_path / "disk.img", 64 * KiB)
    live, live_overlay = spawn_child(base)
    dead, dead_overlay = spawn_child(base)
    try:
        assert {live_overlay, dead_overlay} == {f"{base}.cow0.layer1", f"{base}.cow1.layer1"}
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert os.path.exists(dead_overlay) and os.path.exists(dead_overlay + ".bm")
        with caplog.at_level(logging.WARNING, logger="xnbdd"):
            backend = CowBackend.open(base)
        assert any(
            dead_overlay in r.getMessage() and "stale" in r.getMessage() for r in caplog.records
        )
        # the live instance keeps its overlay; the dead one's name is free again
        assert os.path.exists(live_overlay) and os.path.exists(live_overlay + ".bm")
        assert backend.overlay_path == dead_overlay
        assert await backend.read(0, 5) != b"child"  # a fresh overlay, not the dead one's data
        await backend.close()
    finally:
        for child in (live, dead):
            child.kill()
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
    # the second child is gone now too; a leftover bitmap without its data file (a crash inside
    # close) is stale as well
    Path(f"{base}.cow7.layer1.bm").write_bytes(bytes(8))
    backend = CowBackend.open(base)
    await backend.close()
    assert os.listdir(tmp_path) == ["disk.img"]
