"""One cow overlay served by several processes (the daemon's workers, docs/data-path.md): real
processes attach to the overlay's descriptors and write into it at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from xnbdd.backends.bitmap import BLOCK_SIZE
from xnbdd.backends.cow import CowBackend

BLOCKS = 2048
SECTOR = 512
WRITERS = 2

# A process that attaches to the overlay, waits for "go" on stdin, then writes its part, one
# request each: "sectors", every WRITERS-th 512-byte sector (from its index) of every block;
# "blocks", every WRITERS-th block whole (from its index), so that every bitmap byte gets bits
# from every process.
WRITER = textwrap.dedent(
    """
    import sys, trio
    from xnbdd.backends.cow import CowBackend

    def main() -> None:
        index, inline, unit, base, overlay, base_fd, overlay_fd, bitmap_fd = sys.argv[1:]
        cow = CowBackend.attach(int(base_fd), base, int(overlay_fd), overlay, int(bitmap_fd))
        print("ready", flush=True)
        sys.stdin.readline()
        me = int(index)
        if unit == "blocks":
            parts = [
                (block * {size}, bytes([me + 1, block % 251]) * ({size} // 2))
                for block in range(me, {blocks}, {writers})
            ]
        else:
            parts = [
                (block * {size} + sector * {sector}, bytes([me + 1, block % 251]) * ({sector} // 2))
                for block in range({blocks})
                for sector in range(me, {sectors}, {writers})
            ]

        async def write() -> None:
            for offset, data in parts:
                if inline == "inline" and cow.try_write(offset, data):
                    continue  # as a connection's thread: at once, or else on the loop
                await cow.write(offset, data, fua=False)
            await cow.flush()
            await cow.close()

        trio.run(write)

    main()
    """
).format(
    blocks=BLOCKS, sectors=BLOCK_SIZE // SECTOR, writers=WRITERS, sector=SECTOR, size=BLOCK_SIZE
)


def expected_sector(block: int, sector: int, unit: str) -> bytes:
    writer = block % WRITERS if unit == "blocks" else sector % WRITERS
    return bytes([writer + 1, block % 251]) * (SECTOR // 2)


@pytest.fixture(params=["event loop", "inline"])
def path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Writes as the event loop makes them (on the disk) or as connection threads make them,
    inline (on tmpfs, where the overlay never makes them wait)."""
    if request.param == "event loop":
        yield tmp_path, request.param
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d), request.param


@pytest.mark.parametrize("unit", ["sectors", "blocks"])
def test_processes_filling_the_same_absent_blocks_lose_no_write(
    path: tuple[Path, str], unit: str
) -> None:
    """Every block is absent, and both processes write into it at once. Sectors: each write
    copies the base block up first, and without the cross-process lock one process's copy-up
    lands on the other's fresh sectors. Whole blocks (no copy-up): neighbours in one bitmap
    byte, and without the lock one process's bit update drops the other's bit."""
    tmp_path, how = path
    base = tmp_path / "base.img"
    base.write_bytes(b"\xee" * BLOCKS * BLOCK_SIZE)
    cow = CowBackend.open(str(base))
    procs: list[subprocess.Popen[str]] = []
    try:
        fds = cow.descriptors()
        for index in range(WRITERS):
            args = [str(index), how, unit, str(base), cow.overlay_path, *map(str, fds)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WRITER, *args],
                    pass_fds=fds,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:  # as close to together as two processes can start
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.wait(timeout=300) == 0
        assert cow.bitmap.count() == BLOCKS, "a bit set by one process was lost"
        data = trio.run(cow.read, 0, BLOCKS * BLOCK_SIZE)
        view = memoryview(data)  # slices without copies: 16,384 sectors of 8 MiB
        sectors = [
            (block, sector) for block in range(BLOCKS) for sector in range(BLOCK_SIZE // SECTOR)
        ]
        lost = [
            (block, sector)
            for block, sector in sectors
            if view[(start := block * BLOCK_SIZE + sector * SECTOR) : start + SECTOR]
            != expected_sector(block, sector, unit)
        ]
        assert not lost, f"{len(lost)} sectors lost, first {lost[:4]}"
    finally:
        for proc in procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        trio.run(cow.close)
    assert base.read_bytes() == b"\xee" * BLOCKS * BLOCK_SIZE
    assert sorted(os.listdir(tmp_path)) == ["base.img"]


async def test_a_flush_in_one_process_syncs_what_another_wrote(tmp_path: Path) -> None:
    """The bits another process sets are seen at once, through the shared mapping."""
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * BLOCK_SIZE))
    cow = CowBackend.open(str(base))
    try:
        other = CowBackend.attach(
            os.dup(cow.base.fd),
            str(base),
            os.dup(cow.overlay.fd),
            cow.overlay_path,
            os.dup(cow.bitmap.fd),
        )
        await other.write(3 * BLOCK_SIZE + 100, b"hello", fua=False)
        assert cow.bitmap.test(3) and not cow.bitmap.test(4)
        assert bytes(await cow.read(3 * BLOCK_SIZE + 100, 5)) == b"hello"
        await cow.flush()
        await other.close()  # a worker's close leaves the overlay to its owner
        assert os.path.exists(cow.overlay_path) and os.path.exists(cow.bitmap_path)
        with open(cow.bitmap_path, "rb") as f:
            assert f.read(1) == b"\x08"
    finally:
        await cow.close()
    assert not os.path.exists(cow.overlay_path)
