"""Target mode: a regular file or a block device, served with positional I/O.

Every read and write is positional (no shared file offset, docs/decisions.md D11). I/O that
cannot block runs on the event loop: a read first tries RWF_NOWAIT (served from the page cache or
EAGAIN), and files on tmpfs/ramfs never wait for a device. Everything else goes to a bounded pool
of worker threads -- except a connection thread's write (``try_write``) where the file system
refuses RWF_NOWAIT for buffered writes (ext4): that thread writes into the page cache itself.

An image may be truncated underneath a live server (docs/faults.md). One rule then: what is not
there any more is EIO, never zeros made up on the spot; a write past the current end is ENOSPC
(it would grow the file beyond what clients were told); ``size`` is always the file's current
size, so a new client is told the truth and the change is logged once. The inline write path
(``try_write``, every small write of the data plane) asks the kernel for the end at most once
every ``ROOM_RECHECK_NS`` and for any write past the end last seen, not for every write.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from time import monotonic_ns
from typing import TypeVar

import trio

from xnbdd.backends import linux
from xnbdd.backends.base import (
    MAX_EXTENTS,
    Capabilities,
    ChangeGuard,
    Extent,
    FileRange,
    PipedPayload,
)

T = TypeVar("T")

log = logging.getLogger("xnbdd")

THREADS = 16  # worker threads per open image
SENDFILE_MIN = 64 * 1024  # smaller reads are cheaper copied and batched into one writev
# How long an inline write trusts the end of the file last seen: a truncation underneath is
# noticed by writes this long after it at the latest (an lseek per write cost a third of a
# microsecond, a tenth of the data plane's whole write); reads that meet the end notice it at once.
ROOM_RECHECK_NS = 1_000_000


class FileBackend:
    """An image file or block device, shared by every connection of the export."""

    def __init__(self, fd: int, path: str, *, readonly: bool) -> None:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ValueError(f"{path}: not a regular file or block device")
        self.fd = fd
        self.path = path
        self.readonly = readonly
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._size = linux.file_size(fd)
        self._grows = not self.is_block_device  # a write past the end would grow the image
        self._room_until = 0  # monotonic_ns until which try_write trusts ``_size``
        self._limiter = trio.CapacityLimiter(THREADS)
        self._inline = not self.is_block_device and linux.is_memory_fs(fd)
        self._nowait_read = not self._inline
        self._nowait_write = not self._inline
        self._zero_range_ok = True  # these two are cleared at the first "unsupported"
        self._allocate_ok = True
        if readonly:
            self._punch_ok = False
        elif self.is_block_device:
            self._punch_ok = linux.block_queue_limit(fd, "discard_max_bytes") > 0
        else:
            self._punch_ok = self._probe_punch()
        if self.is_block_device:
            self._fast_zero_ok = linux.block_queue_limit(fd, "write_zeroes_max_bytes") > 0
        else:  # a punched hole, or zero-range / punch + allocate when holes are not wanted
            self._fast_zero_ok = self._punch_ok
        self._closed = False
        self.guard: ChangeGuard | None = None  # a snapshot being copied (snapshot.py)

    @classmethod
    def open(cls, path: str, *, readonly: bool) -> FileBackend:
        """Open an image. OSError (missing, permission) or ValueError (not a file or device)."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership; retry plainly
            fd = os.open(path, flags)
        try:
            return cls(fd, path, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

    def _probe_punch(self) -> bool:
        """Can this file system punch holes? Probed past the end with KEEP_SIZE: no data moves."""
        probe_at = max(self._size, 0) + (1 << 20)
        try:
            linux.fallocate(
                self.fd, linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE, probe_at, 4096
            )
        except OSError:
            return False
        return True

    # -- Backend protocol ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The current size: an image truncated or grown underneath is noticed (and logged)."""
        try:
            # Asked for every write and hole check: lseek costs a quarter of an fstat, and the
            # file offset it moves is never used (positional I/O only).
            if self.is_block_device:
                current = linux.file_size(self.fd)
            else:
                current = os.lseek(self.fd, 0, os.SEEK_END)
                self._room_until = monotonic_ns() + ROOM_RECHECK_NS
        except OSError:
            return self._size  # closed: the last size known
        if current != self._size:
            log.warning("image %s changed size from %d to %d bytes", self.path, self._size, current)
            self._size = current
        return current

    def _check_room(self, offset: int, length: int) -> None:
        """ENOSPC for a write past the current end of a regular file: it would grow the image
        beyond the size clients were told (block devices cannot grow)."""
        if not self.is_block_device and offset + length > self.size:
            raise OSError(errno.ENOSPC, f"the image now ends at {self._size} bytes")

    @property
    def memory_fs(self) -> bool:
        """A file of a memory file system (tmpfs, ramfs): its I/O never waits for a device."""
        return self._inline

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            readonly=self.readonly,
            flush=True,
            fua=not self.readonly,
            trim=self._punch_ok,
            zero=not self.readonly,
            fast_zero=not self.readonly and self._fast_zero_ok,
            cache=True,
            multi_conn=True,
            block_status=True,
        )

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        try:
            data = self._try_read_bytes(offset, length)
            if data is not None:
                return data
            buf = bytearray(length)  # not in memory: wait for the device in a worker thread
            await self._thread(linux.read_all, self.fd, memoryview(buf), offset)
        except OSError as err:
            if err.errno == errno.EIO:
                _ = self.size  # an end of file met: notice (and log) the new size
            raise
        return buf

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        """InlineIO: large reads of a memory file system go out with sendfile (its pages are
        never on a device, so sending cannot block, and no copy passes through Python); other
        data if it can be had without waiting; else None."""
        if self._inline:
            if length >= SENDFILE_MIN:
                if offset + length <= self.size:
                    return FileRange(self.fd, offset, length)
            else:  # ``_try_read_bytes``, inline: the data plane's every small read
                data = os.pread(self.fd, length, offset)
                if len(data) == length:
                    return data
        return self._try_read_bytes(offset, length)  # past the end: EIO from the short read

    def _try_read_bytes(self, offset: int, length: int) -> bytes | bytearray | None:
        """The data, if it can be had without waiting (memory file system, or page cache via
        RWF_NOWAIT); else None."""
        if self._inline:
            data = os.pread(self.fd, length, offset)  # no zero-filled buffer to allocate first
            if len(data) == length:
                return data
        buf = bytearray(length)
        return buf if self._read_nowait(memoryview(buf), offset) == length else None

    def try_read_into(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from ``offset`` if that needs no waiting; False: nothing promised."""
        return self._read_nowait(view, offset) == len(view)

    def _read_nowait(self, view: memoryview, offset: int) -> int:
        """Bytes read into ``view`` without waiting for a device (0: it would have to wait)."""
        if self._inline:
            linux.read_all(self.fd, view, offset)
            return len(view)
        if not self._nowait_read:
            return 0
        try:
            return os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in linux.UNSUPPORTED:
                self._nowait_read = False
            elif e.errno != errno.EAGAIN:
                raise
            return 0

    def is_hole(self, offset: int, length: int) -> bool:
        """Whether a read of this range may be answered as a hole (structured replies): a file
        range without data reads as zeros. Asked on the event loop, so only where the lseek
        cannot wait for a device: memory file systems (elsewhere the extent lookup may read
        metadata from disk; block_status does that in a thread)."""
        return (
            self._inline
            and linux.is_hole(self.fd, offset, length)
            and (
                offset + length <= self.size  # past the end is not a hole: it is not there
            )
        )

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """InlineIO, on a connection's thread: write now (not FUA) unless a snapshot's guard
        must wait first or the page cache asks to wait; False means nothing was promised and
        ``write`` must be used (rewriting bytes already written is harmless). Where the file
        system refuses RWF_NOWAIT for buffered writes (ext4), the write is made all the same:
        a copy into the page cache, which waits (for dirty pages to be written back, say), if
        ever, as a worker thread would -- and through a worker thread every write cost the
        event loop a task and two thread hand-overs (0.17x nbdkit at QD 16 on ext4)."""
        length = len(data)  # the data plane's payloads are bytes-like of unsigned bytes
        # ``_may_write_now``, inline: the data plane's every small write
        if self._grows and (offset + length > self._size or monotonic_ns() > self._room_until):
            self._check_room(offset, length)
        if self.guard is not None and not self._guarded_now(offset, length):
            return False
        if self._inline or not self._nowait_write:
            done = os.pwrite(self.fd, data, offset)  # no iovec list or view to build
            if done < length:
                linux.write_all(self.fd, memoryview(data)[done:], offset + done)
            return True
        return self._write_nowait(offset, data)

    def _write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """The page cache's RWF_NOWAIT write (False: it would wait, or is refused); never
        waits, so the event loop may call it."""
        if not self._nowait_write:
            return False
        try:
            done = os.pwritev(self.fd, [data], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in linux.UNSUPPORTED:
                self._nowait_write = False
            elif e.errno != errno.EAGAIN:
                raise
            return False
        return done == len(data)

    @property
    def takes_pipes(self) -> bool:
        """PipeSink: on a memory file system (elsewhere the page cache may make the thread
        wait for the device, and a buffer takes the event loop's path)."""
        return self._inline and not self.readonly

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        if not self._inline or not self._may_write_now(offset, length):
            return False
        payload.write_to(self.fd, offset)
        return True

    def _may_write_now(self, offset: int, length: int) -> bool:
        """ENOSPC past the image's end; False where a snapshot's guard must wait first."""
        if self._grows and (offset + length > self._size or monotonic_ns() > self._room_until):
            self._check_room(offset, length)  # past the end last seen, or seen too long ago
        return self.guard is None or self._guarded_now(offset, length)

    async def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``: inline when the data is cached, else in a thread."""
        done = self._read_nowait(view, offset)
        if done < len(view):
            await self._thread(linux.read_all, self.fd, view[done:], offset + done)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        view = memoryview(data).cast("B")
        self._check_room(offset, len(view))
        await self._guarded(offset, len(view))
        if fua:  # RWF_DSYNC: this write is durable when pwritev returns
            await self._thread(linux.write_all, self.fd, view, offset, os.RWF_DSYNC)
            return
        if self._inline:  # a memory file system never waits
            linux.write_all(self.fd, view, offset)
        elif not self._write_nowait(offset, view):
            await self._thread(linux.write_all, self.fd, view, offset)

    async def flush(self) -> None:
        await self._thread(os.fdatasync, self.fd)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Punch a hole (file) or discard (device); advisory, so nothing happens if unsupported."""
        if not self._punch_ok:
            return
        await self._guarded(offset, length)
        if self.is_block_device:
            await self._thread(linux.discard, self.fd, offset, length)
        else:
            await self._thread(self._punch, offset, length)
        if fua:
            await self.flush()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        self._check_room(offset, length)
        await self._guarded(offset, length)
        await self._thread(self.zero_sync, offset, length, may_trim, fast)
        if fua:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self._thread(os.posix_fadvise, self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.is_block_device:
            return [Extent(length)]
        size = self.size
        if offset >= size:  # truncated underneath: no allocation to report, and no zeros
            raise OSError(errno.EIO, f"the image now ends at {size} bytes")
        length = min(length, size - offset)  # a prefix is an allowed answer
        return await self._thread(linux.extents, self.fd, offset, length, MAX_EXTENTS)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly:
                await self.flush()
        finally:
            os.close(self.fd)

    def release(self) -> None:
        """Close without flushing: nothing written needs to last (a read-only image, or an
        overlay that is removed or handed to another process). Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def copy_into(self, dst_fd: int, offset: int, length: int) -> None:
        """Blocking: copy bytes [offset, offset + length) to the same place in ``dst_fd``, holes
        staying holes."""
        linux.copy_sparse(self.fd, dst_fd, offset, length)

    # -- SnapshotSource (snapshot.py) ---------------------------------------------------------

    def snapshot_clone(self, dst_fd: int, size: int | None = None) -> bool:
        """Reflink the image (its first ``size`` bytes: default, its size as last seen) into the
        empty file ``dst_fd``; False when the file system cannot (nothing written)."""
        size = self._size if size is None else size
        if self.is_block_device or os.fstat(self.fd).st_size != size:
            return False
        try:
            linux.clone(self.fd, dst_fd)
        except OSError as e:
            if e.errno not in linux.UNSUPPORTED | {errno.EXDEV, errno.EINVAL, errno.EBADF}:
                raise
            return False
        return True

    def snapshot_runs(self, offset: int, length: int) -> Iterable[tuple[int, int]]:
        if self.is_block_device:
            return [(offset, offset + length)]
        return linux.data_runs(self.fd, offset, length)

    def snapshot_read(self, view: memoryview, offset: int) -> None:
        linux.read_all(self.fd, view, offset)

    def set_snapshot_guard(self, guard: ChangeGuard | None) -> None:
        self.guard = guard

    def _guarded_now(self, offset: int, length: int) -> bool:
        """A snapshot being copied keeps the range's old bytes first: here only where that
        cannot wait (a memory file system); False: the caller takes the async path."""
        guard = self.guard
        if guard is None or guard.covered(offset, length):
            return True
        if not self._inline:
            return False
        guard.preserve(offset, length)
        return True

    async def _guarded(self, offset: int, length: int) -> None:
        guard = self.guard
        if guard is not None and not guard.covered(offset, length):
            # a worker thread even on tmpfs: a TRIM may have a whole disk's bytes to keep
            await trio.to_thread.run_sync(guard.preserve, offset, length, limiter=self._limiter)

    # -- helpers (blocking ones run in a worker thread) ----------------------------------------

    async def _thread(self, fn: Callable[..., T], *args: object) -> T:
        if self._inline:  # memory file system: nothing to wait for
            return fn(*args)
        result: T = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        return result

    def _punch(self, offset: int, length: int) -> None:
        mode = linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE
        linux.fallocate(self.fd, mode, offset, length)

    def zero_sync(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        """Make the range read as zeros (blocking).

        Cheapest first: punch a hole when holes are allowed, else zero-range, else (files) punch
        and re-allocate. With ``fast`` and none of these available, ENOTSUP before any change;
        without ``fast`` write zeros in bounded chunks.
        """
        if self.is_block_device:
            self._zero_device(offset, length, may_trim, fast)
            return
        if may_trim and self._punch_ok:
            self._punch(offset, length)
            return
        if self._zero_range_ok:
            try:
                mode = linux.FALLOC_FL_ZERO_RANGE | linux.FALLOC_FL_KEEP_SIZE
                linux.fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in linux.UNSUPPORTED:
                    raise
                self._zero_range_ok = False
        if self._punch_ok and self._allocate(offset, length):
            # e.g. tmpfs: punched and re-allocated reads zeros and leaves no hole (NO_HOLE)
            self._punch(offset, length)
            self._allocate(offset, length)
            return
        if fast:
            raise OSError(errno.ENOTSUP, "fast zeroing is not supported by this file system")
        linux.write_zeros(self.fd, offset, length)

    def _allocate(self, offset: int, length: int) -> bool:
        """Allocate the holes of a range, data untouched; False if the file system cannot."""
        if not self._allocate_ok:
            return False
        try:
            linux.fallocate(self.fd, linux.FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in linux.UNSUPPORTED:
                raise
            self._allocate_ok = False
        return self._allocate_ok

    def _zero_device(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        """Block devices: the kernel wants sector-aligned ranges; unaligned edges get zero bytes.

        fallocate PUNCH_HOLE on a device is a write-zeroes/discard without fallback (so it is
        fast or fails); ZERO_RANGE falls back to writing zeros inside the kernel.
        """
        sector = linux.sector_size(self.fd)
        start = -(-offset // sector) * sector
        stop = (offset + length) // sector * sector
        if stop <= start:
            if fast:
                raise OSError(errno.ENOTSUP, "range too small to zero quickly on this device")
            linux.write_zeros(self.fd, offset, length)
            return
        fast_path = may_trim or self._fast_zero_ok
        if fast and not fast_path:
            raise OSError(errno.ENOTSUP, "this device cannot zero quickly")
        if fast_path:
            mode = linux.FALLOC_FL_KEEP_SIZE | (
                linux.FALLOC_FL_PUNCH_HOLE if may_trim else linux.FALLOC_FL_ZERO_RANGE
            )
            try:
                linux.fallocate(self.fd, mode, start, stop - start)
            except OSError as e:
                if e.errno not in linux.UNSUPPORTED:
                    raise
                if fast:
                    raise OSError(errno.ENOTSUP, "this device cannot zero quickly") from e
                linux.zero_out(self.fd, start, stop - start)
        else:
            linux.zero_out(self.fd, start, stop - start)
        if start > offset:
            linux.write_zeros(self.fd, offset, start - offset)
        if offset + length > stop:
            linux.write_zeros(self.fd, stop, offset + length - stop)
