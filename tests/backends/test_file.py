"""FileBackend over real files (ext4 and tmpfs), a real ext2 mount and a real loop device."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from xnbdd.backends.base import MAX_EXTENTS, Extent
from xnbdd.backends.file import ROOM_RECHECK_NS, FileBackend
from xnbdd.backends.linux import is_memory_fs

from .loopdev import loop_device, mounted_fs, require_loop

MiB = 1 << 20


@pytest.fixture(params=["disk", "tmpfs"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the disk file system (threaded I/O) or on tmpfs (inline I/O)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


def make_image(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def holes(extents: list[Extent]) -> list[tuple[int, bool]]:
    return [(e.length, e.hole) for e in extents]


async def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileBackend.open(str(tmp_path / "missing"), readonly=False)
    with pytest.raises(ValueError, match="not a regular file or block device"):
        FileBackend.open(str(tmp_path), readonly=True)


async def test_roundtrip_unaligned(image_dir: Path) -> None:
    path = make_image(image_dir / "disk.img", 8 * MiB + 1000)
    backend = FileBackend.open(path, readonly=False)
    assert backend.size == 8 * MiB + 1000
    assert backend._inline == is_memory_fs(backend.fd)
    payload = os.urandom(3 * MiB + 17)
    await backend.write(5, payload, fua=False)
    await backend.write(8 * MiB + 1000 - 3, b"end", fua=True)
    got = await backend.read(5, len(payload))
    assert isinstance(got, (bytes, bytearray)) and got == payload
    assert await backend.read(0, 5) == bytes(5)
    assert await backend.read(8 * MiB + 997, 3) == b"end"
    await backend.flush()
    await backend.close()
    with open(path, "rb") as f:
        f.seek(5)
        assert f.read(len(payload)) == payload


async def test_concurrent_writes_do_not_interfere(image_dir: Path) -> None:
    path = make_image(image_dir / "disk.img", 4 * MiB)
    backend = FileBackend.open(path, readonly=False)
    chunks = {i: os.urandom(65536 - 7) for i in range(64)}
    async with trio.open_nursery() as nursery:
        for i, data in chunks.items():
            nursery.start_soon(backend.write, i * 65536, data, i % 2 == 0)
    async with trio.open_nursery() as nursery:
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = bytes(await backend.read(i * 65536, 65536 - 7))

        for i in chunks:
            nursery.start_soon(read, i)
    assert results == chunks
    await backend.close()


async def test_readonly(tmp_path: Path) -> None:
    path = make_image(tmp_path / "disk.img", MiB)
    backend = FileBackend.open(path, readonly=True)
    caps = backend.capabilities
    assert caps.readonly and not caps.trim and not caps.zero and not caps.fua and caps.multi_conn
    with pytest.raises(OSError) as info:
        await backend.write(0, b"x", fua=False)
    assert info.value.errno == errno.EBADF
    assert await backend.read(0, 4) == bytes(4)
    await backend.close()


async def test_block_status_reports_holes(image_dir: Path) -> None:
    path = make_image(image_dir / "disk.img", 16 * MiB)
    backend = FileBackend.open(path, readonly=False)
    assert holes(await backend.block_status(0, 16 * MiB)) == [(16 * MiB, True)]
    await backend.write(4 * MiB, b"\x01" * 65536, fua=False)
    extents = await backend.block_status(0, 16 * MiB)
    assert holes(extents) == [(4 * MiB, True), (65536, False), (12 * MiB - 65536, True)]
    assert extents[0].zero and not extents[1].zero
    # a window starting inside the data
    assert holes(await backend.block_status(4 * MiB + 4096, 8192)) == [(8192, False)]
    await backend.close()


async def test_block_status_caps_the_extent_count(tmp_path: Path) -> None:
    count = MAX_EXTENTS  # data/hole pairs: twice the cap of extents
    path = make_image(tmp_path / "disk.img", 2 * count * 4096)
    fd = os.open(path, os.O_WRONLY)
    for i in range(count):
        os.pwrite(fd, b"\xff" * 4096, 2 * i * 4096)
    os.close(fd)
    backend = FileBackend.open(path, readonly=True)
    extents = await backend.block_status(0, backend.size)
    assert len(extents) == MAX_EXTENTS
    assert sum(e.length for e in extents) == MAX_EXTENTS * 4096  # a prefix of the range
    assert [e.hole for e in extents[:4]] == [False, True, False, True]
    await backend.close()


async def test_trim_punches_a_hole(image_dir: Path) -> None:
    path = make_image(image_dir / "disk.img", 4 * MiB)
    backend = FileBackend.open(path, readonly=False)
    assert backend.capabilities.trim  # ext4 and tmpfs both punch holes
    data = os.urandom(MiB)
    await backend.write(0, data, fua=False)
    await backend.trim(256 * 1024, 512 * 1024, fua=True)
    assert holes(await backend.block_status(0, MiB)) == [
        (256 * 1024, False),
        (512 * 1024, True),
        (256 * 1024, False),
    ]
    got = await backend.read(0, MiB)
    assert got[: 256 * 1024] == data[: 256 * 1024]
    assert got[256 * 1024 : 768 * 1024] == bytes(512 * 1024)
    assert got[768 * 1024 :] == data[768 * 1024 :]
    await backend.close()


async def test_zero_with_and_without_holes(image_dir: Path) -> None:
    path = make_image(image_dir / "disk.img", 4 * MiB)
    backend = FileBackend.open(path, readonly=False)
    assert backend.capabilities.zero and backend.capabilities.fast_zero
    await backend.write(0, b"\xaa" * (2 * MiB), fua=False)
    await backend.flush()
    await backend.zero(100, MiB, may_trim=True, fast=True, fua=False)
    assert await backend.read(100, MiB) == bytes(MiB)
    assert await backend.read(0, 100) == b"\xaa" * 100
    assert holes(await backend.block_status(4096, MiB - 8192))[0][1]  # a real hole
    blocks_before = os.stat(path).st_blocks
    await backend.zero(MiB + 200, 512 * 1024, may_trim=False, fast=True, fua=True)
    assert await backend.read(MiB + 200, 512 * 1024) == bytes(512 * 1024)
    assert await backend.read(MiB + 100, 100) == b"\xaa" * 100
    assert os.stat(path).st_blocks >= blocks_before  # NO_HOLE: still allocated
    await backend.close()


async def test_zero_where_only_holes_are_fast(tmp_path: Path) -> None:
    """ext2 punches holes but has neither zero-range nor preallocation."""
    with mounted_fs(tmp_path, "ext2", 32 * MiB) as mnt:
        path = make_image(mnt / "disk.img", 4 * MiB)
        backend = FileBackend.open(path, readonly=False)
        assert backend.capabilities.trim and backend.capabilities.fast_zero
        await backend.write(0, b"\x55" * (2 * MiB), fua=True)
        with pytest.raises(OSError) as info:
            await backend.zero(0, MiB, may_trim=False, fast=True, fua=False)
        assert info.value.errno == errno.ENOTSUP
        assert await backend.read(0, 2 * MiB) == b"\x55" * (2 * MiB)  # untouched
        await backend.zero(10, MiB, may_trim=False, fast=False, fua=False)
        assert await backend.read(10, MiB) == bytes(MiB)
        assert holes(await backend.block_status(0, 2 * MiB)) == [(2 * MiB, False)]
        await backend.zero(MiB + 100, 4096, may_trim=True, fast=True, fua=False)
        got = await backend.read(MiB + 90, 8192)
        assert got == b"\x55" * 10 + bytes(4096) + b"\x55" * 4086
        await backend.close()


async def test_cache_changes_nothing(tmp_path: Path) -> None:
    path = make_image(tmp_path / "disk.img", MiB)
    backend = FileBackend.open(path, readonly=False)
    await backend.write(0, b"abc", fua=False)
    await backend.cache(0, MiB)
    assert await backend.read(0, 3) == b"abc"
    await backend.close()


async def test_inline_writes_never_grow_a_truncated_image(image_dir: Path) -> None:
    """The inline write path trusts the end it last saw for ROOM_RECHECK_NS only: a write past
    the new end is ENOSPC at the latest that long after the truncation, at once when a read met
    the end or when the write goes past the end last seen, and the file never grows."""
    size, new_size = 4 * MiB, 2 * MiB
    path = make_image(image_dir / "disk.img", size)
    backend = FileBackend.open(path, readonly=False)
    try:
        # (on a disk file system a write may be declined, True or False: never refused)
        backend.try_write(3 * MiB, b"a" * 4096)  # the end was just seen: no lseek needed
        os.truncate(path, new_size)
        await trio.sleep(ROOM_RECHECK_NS / 1e9)  # what was seen is stale now
        with pytest.raises(OSError) as raised:
            backend.try_write(3 * MiB, b"b" * 4096)
        assert raised.value.errno == errno.ENOSPC
        assert os.stat(path).st_size == new_size
        backend.try_write(new_size - 4096, b"c" * 4096)  # what is left is writable

        os.truncate(path, MiB)
        with pytest.raises(OSError) as raised:  # a read meets the end: the size is re-read
            await backend.read(new_size - 4096, 4096)
        assert raised.value.errno == errno.EIO
        with pytest.raises(OSError) as raised:  # so the write right after is refused
            backend.try_write(MiB, b"d" * 4096)
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as raised:  # past the end last seen: asked at once
            backend.try_write(MiB - 1, b"ee")
        assert raised.value.errno == errno.ENOSPC
        assert os.stat(path).st_size == MiB
        with open(path, "rb") as f:
            assert f.read() == bytes(MiB)  # none of the refused bytes landed
    finally:
        backend.release()


async def test_block_device(tmp_path: Path) -> None:
    require_loop()
    size = 16 * MiB
    with loop_device(tmp_path / "backing.img", size) as device:
        backend = FileBackend.open(device, readonly=False)
        assert backend.is_block_device
        assert backend.size == size  # from the device, not st_size (0)
        caps = backend.capabilities
        assert caps.trim  # loop devices over ext4 discard
        data = os.urandom(2 * MiB)
        await backend.write(1000, data, fua=True)
        assert await backend.read(1000, len(data)) == data
        assert await backend.block_status(0, size) == [Extent(size)]
        await backend.trim(8 * MiB, MiB, fua=False)  # advisory: old data or zeros, never an error
        await backend.zero(1001, 3 * 4096 + 5, may_trim=False, fast=False, fua=True)
        got = await backend.read(1000, 3 * 4096 + 7)
        assert got == data[:1] + bytes(3 * 4096 + 5) + data[3 * 4096 + 6 : 3 * 4096 + 7]
        await backend.zero(MiB, MiB, may_trim=True, fast=False, fua=False)
        assert await backend.read(MiB, MiB) == bytes(MiB)
        await backend.flush()
        await backend.close()
        with open(tmp_path / "backing.img", "rb") as f:
            f.seek(2 * MiB)
            assert f.read(1000) == data[-1000:]


def test_the_thread_writes_at_once_where_rwf_nowait_is_refused(tmp_path: Path) -> None:
    """On a disk file system the page cache takes a write at once; where the file system
    refuses RWF_NOWAIT for buffered writes (ext4 on this kernel: ENOTSUP), the connection's
    thread writes all the same rather than send every write to the event loop and a worker
    thread (that was 16k IOPS at QD 16 against nbdkit's 105k). At most the first write learns
    the refusal; the rest are written at once, on any file system (their pages are cached)."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))  # in the page cache
    backend = FileBackend.open(str(path), readonly=False)
    try:
        assert not backend.memory_fs
        backend.try_write(4096, b"a" * 4096)  # may learn that RWF_NOWAIT is refused
        assert backend.try_write(8192, b"b" * 4096)
        assert backend.try_write(4096, b"a" * 4096)
        assert trio.run(backend.read, 4096, 8192) == b"a" * 4096 + b"b" * 4096
    finally:
        trio.run(backend.close)
    assert path.read_bytes()[4096:12288] == b"a" * 4096 + b"b" * 4096
