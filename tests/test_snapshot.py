"""Snapshots on real file systems: copy (ext4, tmpfs), reflink (XFS, btrfs on a loop device),
block-device images, cow-target sources, refusal to overwrite, and a full disk."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.backends.loopdev import loop_device, mounted_fs, require_loop
from xnbdd.backends import linux
from xnbdd.backends.cow import CowBackend
from xnbdd.backends.file import FileBackend
from xnbdd.snapshot import (
    LiveSnapshot,
    remove_partial_snapshots,
    snapshot_path,
    take_snapshot,
)

MiB = 1 << 20
NOW = 1764067200.7


def sparse_image(path: Path, size: int) -> bytes:
    """An image with two data islands in a sparse file; returns its full content."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(MiB))
        f.seek(size - 5000)
        f.write(b"\x42" * 5000)
    return path.read_bytes()


@pytest.fixture(params=["disk", "tmpfs"])
def copy_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "disk":
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


async def test_copy_path_keeps_content_and_holes(copy_dir: Path) -> None:
    image = copy_dir / "disk.img"
    content = sparse_image(image, 32 * MiB)
    result = await take_snapshot(str(image), now=NOW)
    assert result.path == f"{image}.snapshot.1764067200" == snapshot_path(str(image), NOW)
    assert result.method == "copy"  # neither ext4 nor tmpfs can reflink
    assert result.size == 32 * MiB and result.seconds >= 0
    snap = Path(result.path)
    assert snap.read_bytes() == content
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert snap.stat().st_blocks * 512 < 8 * MiB  # holes stayed holes
    assert sorted(os.listdir(copy_dir)) == ["disk.img", snap.name]  # no temporary file left


async def test_snapshot_from_the_daemons_open_descriptor(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sparse_image(image, 4 * MiB)
    backend = FileBackend.open(str(image), readonly=False)
    await backend.write(0, b"written through the daemon", fua=False)  # not yet flushed
    result = await take_snapshot(str(image), backend.fd, now=NOW)
    assert Path(result.path).read_bytes() == image.read_bytes()
    assert Path(result.path).read_bytes().startswith(b"written through the daemon")
    result2 = await take_snapshot(str(image), now=NOW + 1, source=backend)
    assert Path(result2.path).read_bytes() == image.read_bytes()
    await backend.close()


async def test_timestamp_is_zero_padded() -> None:
    assert snapshot_path("/x/disk", 12345.9) == "/x/disk.snapshot.00012345"


async def test_existing_snapshot_is_never_overwritten(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sparse_image(image, 4 * MiB)
    first = await take_snapshot(str(image), now=NOW)
    before = Path(first.path).read_bytes()
    with open(image, "r+b") as f:
        f.write(b"changed")
    with pytest.raises(FileExistsError, match="already exists"):
        await take_snapshot(str(image), now=NOW)
    assert Path(first.path).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["disk.img", Path(first.path).name]


async def test_missing_image_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"snapshot of .*missing\.img.* failed") as info:
        await take_snapshot(str(tmp_path / "missing.img"), now=NOW)
    assert info.value.errno == errno.ENOENT
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
async def test_reflink_path(tmp_path: Path, fstype: str) -> None:
    with mounted_fs(tmp_path, fstype, 320 * MiB) as mnt:
        image = mnt / "disk.img"
        content = sparse_image(image, 64 * MiB)
        result = await take_snapshot(str(image), now=NOW)
        assert result.method == "reflink"
        assert Path(result.path).read_bytes() == content
        assert sorted(os.listdir(mnt)) == sorted(["disk.img", Path(result.path).name])


async def test_reflink_of_a_cow_target(tmp_path: Path) -> None:
    with mounted_fs(tmp_path, "xfs", 320 * MiB) as mnt:
        image = mnt / "base.img"
        sparse_image(image, 8 * MiB)
        backend = CowBackend.open(str(image))
        await backend.write(MiB + 10, b"overlay data", fua=False)
        await backend.zero(8 * MiB - 4096, 4096, may_trim=True, fast=False, fua=False)
        result = await take_snapshot(str(image), now=NOW, source=backend)
        assert result.method == "reflink"
        assert Path(result.path).read_bytes() == await backend.read(0, backend.size)
        assert Path(result.path).read_bytes() != image.read_bytes()  # base untouched
        await backend.close()


async def test_cow_target_copy_path(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    sparse_image(image, 8 * MiB)
    backend = CowBackend.open(str(image))
    await backend.write(3, b"x" * 10000, fua=False)
    result = await take_snapshot(str(image), now=NOW, source=backend)
    assert result.method == "copy"
    assert Path(result.path).read_bytes() == await backend.read(0, backend.size)
    await backend.close()


async def test_block_device_image_copies_the_device_size(tmp_path: Path) -> None:
    require_loop()
    with loop_device(tmp_path / "backing.img", 16 * MiB) as device:
        with open(device, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"on the device")
        link = tmp_path / "disk"  # snapshot lands beside the name given, not in /dev
        link.symlink_to(device)
        result = await take_snapshot(str(link), now=NOW)
        assert result.size == 16 * MiB and result.method == "copy"
        snap = Path(result.path)
        assert snap.stat().st_size == 16 * MiB
        with open(device, "rb") as f:
            assert snap.read_bytes() == f.read()


async def test_full_disk_leaves_no_temporary_file(tmp_path: Path) -> None:
    with mounted_fs(tmp_path, "ext4", 16 * MiB) as mnt:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        image = mnt / "disk.img"
        image.write_bytes(os.urandom(free * 6 // 10 // 4096 * 4096))
        with pytest.raises(OSError, match=r"snapshot of .* failed") as info:
            await take_snapshot(str(image), now=NOW)
        assert info.value.errno == errno.ENOSPC
        assert sorted(p for p in os.listdir(mnt) if p != "lost+found") == ["disk.img"]


# -- the background copy behind a write guard (LiveSnapshot) -----------------------------------


def random_image(path: Path, size: int) -> bytearray:
    content = bytearray(os.urandom(size))
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)
    return content


async def test_changes_after_the_point_stay_out_of_the_snapshot(copy_dir: Path) -> None:
    """Writes (inline and async), zeroes and trims made while the copy runs keep the point's
    bytes in the snapshot and land in the image; the copy really is running meanwhile."""
    image = copy_dir / "disk.img"
    size = 24 * MiB + 4096
    at_point = random_image(image, size)
    backend = FileBackend.open(str(image), readonly=False)
    live = LiveSnapshot(str(image), backend, NOW)
    await live.begin()
    assert live.method == "copy" and live.guard is not None
    assert os.path.exists(live.partial) and not os.path.exists(live.path)
    now = bytearray(at_point)
    copied_while_writing: list[int] = []

    async def change() -> None:
        offsets = [size - 4096, 20 * MiB + 7, 13 * MiB, 5 * MiB + 100, 0]
        for i, offset in enumerate(offsets):
            copied_while_writing.append(live.copied)
            data = bytes([i + 1]) * 5000
            data = data[: size - offset]
            if i % 2 == 0 or not backend.try_write(offset, data):
                await backend.write(offset, data, fua=i == 4)
            now[offset : offset + len(data)] = data
            await trio.sleep(0.01)
        await backend.zero(22 * MiB, 64 * 1024, may_trim=False, fast=False, fua=False)
        now[22 * MiB : 22 * MiB + 64 * 1024] = bytes(64 * 1024)
        await backend.trim(8 * MiB, MiB, fua=False)
        if backend.capabilities.trim:
            now[8 * MiB : 9 * MiB] = bytes(MiB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change)
        result = await live.finish(rate=48 * MiB, step=MiB)  # about half a second
    assert copied_while_writing[-1] < size  # the changes ran while the copier had not finished
    assert result.path == snapshot_path(str(image), NOW) and result.method == "copy"
    assert Path(result.path).read_bytes() == at_point
    assert await backend.read(0, size) == now
    assert live.guard is not None and live.guard.preserved > 0  # some were saved ahead
    assert backend.guard is None  # taken away at the end
    assert sorted(os.listdir(copy_dir)) == ["disk.img", Path(result.path).name]
    await backend.close()


async def test_inline_writes_off_a_memory_file_system_take_the_async_path(
    tmp_path: Path,
) -> None:
    """A connection's thread must not wait for the guard's copy on a disk: it declines."""
    image = tmp_path / "disk.img"
    at_point = random_image(image, 4 * MiB)
    backend = FileBackend.open(str(image), readonly=False)
    live = LiveSnapshot(str(image), backend, NOW)
    await live.begin()
    assert live.guard is not None
    inline = linux.is_memory_fs(backend.fd)
    assert backend.try_write(MiB, b"y" * 4096) is inline  # declined unless tmpfs
    if not inline:
        await backend.write(MiB, b"y" * 4096, fua=False)
    assert live.guard.covered(MiB + 8192, 100)  # that grain is in the snapshot now
    assert not live.guard.covered(2 * MiB, 100)
    result = await live.finish()
    assert Path(result.path).read_bytes() == at_point
    await backend.close()


async def test_a_cow_target_snapshot_in_the_background(copy_dir: Path) -> None:
    image = copy_dir / "base.img"
    sparse_image(image, 8 * MiB)
    backend = CowBackend.open(str(image))
    await backend.write(3, b"a" * 10000, fua=False)
    at_point = bytes(await backend.read(0, backend.size))
    live = LiveSnapshot(str(image), backend, NOW)
    await live.begin()
    assert live.method == "copy"
    await backend.write(MiB + 5, b"b" * 9000, fua=False)  # absent blocks: a copy-up
    await backend.write(0, b"c" * 4096, fua=False)  # a present block, rewritten
    if not backend.try_write(4096, b"d" * 4096):  # as a connection's thread: else the loop
        await backend.write(4096, b"d" * 4096, fua=False)
    await backend.zero(7 * MiB, MiB, may_trim=True, fast=False, fua=False)
    after = bytes(await backend.read(0, backend.size))
    result = await live.finish()
    assert Path(result.path).read_bytes() == at_point
    assert await backend.read(0, backend.size) == after != at_point
    await backend.close()


async def test_a_failing_snapshot_never_fails_a_write(tmp_path: Path) -> None:
    with mounted_fs(tmp_path, "ext4", 16 * MiB) as mnt:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        image = mnt / "disk.img"
        size = free * 6 // 10 // 4096 * 4096
        random_image(image, size)
        backend = FileBackend.open(str(image), readonly=False)
        live = LiveSnapshot(str(image), backend, NOW)
        await live.begin()
        new = os.urandom(size)
        await backend.write(0, new, fua=False)  # preserving it fills the disk: the snapshot fails
        assert live.guard is not None and live.guard.failed is not None
        with pytest.raises(OSError, match=r"snapshot of .* failed") as info:
            await live.finish()
        assert info.value.errno == errno.ENOSPC
        assert await backend.read(0, size) == new
        assert backend.guard is None
        assert sorted(p for p in os.listdir(mnt) if p != "lost+found") == ["disk.img"]
        await backend.close()


async def test_cancelled_copy_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 8 * MiB)
    backend = FileBackend.open(str(image), readonly=False)
    live = LiveSnapshot(str(image), backend, NOW)
    await live.begin()
    with trio.move_on_after(0.2):
        await live.finish(rate=MiB)
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]
    assert backend.guard is None
    await backend.close()


def test_start_up_removes_partial_snapshots_nobody_writes(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"image")
    stale = tmp_path / "disk.img.snapshot.1764067200.partial"
    live = tmp_path / "disk.img.snapshot.1764067201.partial"
    other = tmp_path / "disk.img2.snapshot.1764067200.partial"  # another image's
    done = tmp_path / "disk.img.snapshot.1764067199"
    for path in (stale, live, other, done):
        path.write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a running server is writing this one
        assert remove_partial_snapshots(str(image)) == [str(stale)]
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(["disk.img", live.name, other.name, done.name])


async def test_a_whole_image_trim_during_the_copy(copy_dir: Path) -> None:
    """The guard keeps a huge change's old bytes piece by piece (never the whole range in one
    buffer, nor under its lock at once) and the snapshot is still the point."""
    image = copy_dir / "disk.img"
    size = 12 * MiB
    at_point = random_image(image, size)
    backend = FileBackend.open(str(image), readonly=False)
    live = LiveSnapshot(str(image), backend, NOW)
    await live.begin()
    await backend.zero(0, size, may_trim=True, fast=False, fua=False)
    assert live.guard is not None and live.guard.preserved == size
    result = await live.finish()
    assert Path(result.path).read_bytes() == at_point
    assert await backend.read(0, size) == bytes(size)
    await backend.close()
