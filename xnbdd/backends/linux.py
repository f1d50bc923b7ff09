"""Blocking Linux file primitives shared by the file and cow backends and by snapshots.

fallocate modes, block-device ioctls, SEEK_DATA/SEEK_HOLE extents and hole-keeping copies. Every
function here may block on the disk: callers run them in a worker thread unless they know better.
Stdlib only (ctypes for fallocate/fstatfs, which ``os`` does not expose with mode flags).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from xnbdd.backends.base import Extent

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272
FICLONE = 0x40049409

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6

# errnos meaning "this file system or device cannot do that", as opposed to a real failure
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

COPY_CHUNK = 8 << 20
_ZEROS = bytes(COPY_CHUNK)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags; raises OSError like the os module does."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fs_type(fd: int) -> int:
    """The f_type magic of the file system holding ``fd``."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every ABI
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_memory_fs(fd: int) -> bool:
    """tmpfs/ramfs: I/O never waits for a device, so it may run on the event loop."""
    try:
        return fs_type(fd) in (TMPFS_MAGIC, RAMFS_MAGIC)
    except OSError:
        return False


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def file_size(fd: int) -> int:
    """Size of a regular file (st_size) or of a block device (BLKGETSIZE64, else lseek)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("=Q", buf)[0])
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def sector_size(fd: int) -> int:
    """Logical block size of a block device: discard/zero-out ranges must be aligned to it."""
    try:
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
        return int(struct.unpack("=i", buf)[0]) or 512
    except OSError:
        return 512


def block_queue_limit(fd: int, name: str) -> int:
    """A block device's /sys/.../queue/<name> value (e.g. discard_max_bytes), 0 if unknown."""
    rdev = os.fstat(fd).st_rdev
    base = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    for directory in (base, os.path.dirname(base)):  # a partition's queue is its disk's
        try:
            with open(os.path.join(directory, "queue", name)) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
    return 0


def discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD on the sector-aligned part of the range (the device refuses unaligned ones)."""
    sector = sector_size(fd)
    start = -(-offset // sector) * sector
    stop = (offset + length) // sector * sector
    if stop > start:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", start, stop - start))


def zero_out(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT (the kernel falls back to writing zeros); ranges must be sector-aligned."""
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int, flags: int = 0) -> None:
    """pwritev until every byte is written (short writes happen)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done, flags)


def read_all(fd: int, view: memoryview, offset: int) -> None:
    """preadv until ``view`` is full; EOF first means the file shrank under us."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset + done}")
        done += n


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write zero bytes in bounded chunks (never a length-sized buffer)."""
    end = offset + length
    while offset < end:
        n = min(COPY_CHUNK, end - offset)
        write_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


def extents(fd: int, offset: int, length: int, limit: int) -> list[Extent]:
    """Data and hole extents of [offset, offset + length) from SEEK_DATA/SEEK_HOLE.

    At most ``limit`` extents: the result may cover only a prefix of the range. Bytes past the
    current end of file (a file that shrank) are reported as a hole.
    """
    out: list[Extent] = []
    end = offset + length
    pos = offset
    for start, stop, data in _data_runs(fd, offset, end):
        if len(out) >= limit:
            break
        out.append(Extent(stop - start, hole=not data, zero=not data))
        pos = stop
    if not out:
        out.append(Extent(end - pos))
    return out


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True when [offset, offset + length) holds no data at all (one lseek, SEEK_DATA)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data from offset to the end of file


def _data_runs(fd: int, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Alternating (start, stop, is_data) runs covering [offset, end)."""
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                yield pos, end, False
                return
            if e.errno in UNSUPPORTED or e.errno == errno.EINVAL:
                yield pos, end, True  # cannot tell: say "allocated", which is always safe
                return
            raise
        if data > pos:
            stop = min(data, end)
            yield pos, stop, False
            pos = stop
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole = end
        stop = min(max(hole, pos + 1), end)
        yield pos, stop, True
        pos = stop


def data_runs(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the data runs in [offset, offset + length); holes skipped."""
    for start, stop, data in _data_runs(fd, offset, offset + length):
        if data:
            yield start, stop


def clone(src_fd: int, dst_fd: int) -> None:
    """Reflink the whole of ``src_fd`` into ``dst_fd`` (FICLONE); OSError if not possible."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy [offset, offset + length) to the same offset of ``dst_fd``.

    copy_file_range first (the kernel may reflink or copy server-side); block devices and
    file systems without it fall back to a large-buffer copy that skips all-zero chunks, so the
    destination stays sparse.
    """
    end = offset + length
    pos = offset
    try:
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos, pos)
            if n == 0:
                raise OSError(errno.EIO, f"unexpected end of file at offset {pos}")
            pos += n
        return
    except OSError as e:
        if e.errno not in UNSUPPORTED | {errno.EXDEV, errno.EINVAL}:
            raise
    buf = bytearray(min(COPY_CHUNK, end - pos))
    view = memoryview(buf)
    while pos < end:
        n = min(len(buf), end - pos)
        read_all(src_fd, view[:n], pos)
        if view[:n] != memoryview(_ZEROS)[:n]:
            write_all(dst_fd, view[:n], pos)
        pos += n


def copy_sparse(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy only the data runs of the range; ``dst_fd`` must already read zeros there."""
    for start, stop in data_runs(src_fd, offset, length):
        copy_range(src_fd, dst_fd, start, stop - start)


def punch_or_zero(fd: int, offset: int, length: int) -> None:
    """Make a range of a regular file read as zeros, as a hole where the file system can."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        write_zeros(fd, offset, length)


def clone_or_copy(src_fd: int, dst_fd: int, size: int) -> str:
    """Fill the empty regular file ``dst_fd`` with the first ``size`` bytes of ``src_fd``.

    A reflink when the file system can share extents ("reflink"), else a copy that keeps holes
    ("copy"). ``src_fd`` may be a block device (always copied).
    """
    if not is_block_device(src_fd) and os.fstat(src_fd).st_size == size:
        try:
            clone(src_fd, dst_fd)
            return "reflink"
        except OSError as e:
            if e.errno not in UNSUPPORTED | {errno.EXDEV, errno.EINVAL, errno.EBADF}:
                raise
    os.ftruncate(dst_fd, size)
    if is_block_device(src_fd):
        copy_range(src_fd, dst_fd, 0, size)
    else:
        copy_sparse(src_fd, dst_fd, 0, size)
    return "copy"
