"""cow-target: a read-only base image under a private, throwaway overlay (docs/compat.md §4.3).

The base is opened read-only and never written. Writes go to ``<base>.cow<N>.layer1`` (sparse,
1:1 offsets) in 4 KiB blocks; ``<base>.cow<N>.layer1.bm`` marks the blocks the overlay holds. A
block present in the overlay is read from it, whatever it holds -- so a trimmed or zeroed block
is simply a present block whose overlay bytes are zero (a punched hole), even where the base has
data. Bits only ever go from clear to set.

A partial write to an absent block first copies the base block up ("copy-up"). Writes that touch
absent blocks hold a range lock over their blocks, so two partial writes to one block, or a
copy-up and a full-block write, can never overwrite each other with stale base bytes. Writes to
blocks already present take no lock. The daemon's worker processes serve connections of one
overlay too (docs/data-path.md): every process maps the one bitmap file (``SharedBitmap``), and
the lock over a write's blocks is held against the tasks of this process (``RangeLocks``), then
against the other processes (an OFD lock on the bitmap bytes of those blocks; the range is
widened to whole bitmap bytes, as setting a bit rewrites its byte). A connection's thread
writes absent blocks inline when nobody holds them: it takes the OFD lock without waiting,
through a description of its own, which excludes this process's tasks too; else the write
goes to the event loop.

The overlay file is flock()ed for the life of the instance (by the daemon, which made it and
removes it; workers ``attach`` to its descriptors): at start, an overlay of the same base that
nobody holds locked was left by a crash and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial

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
from xnbdd.backends.bitmap import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    BYTE_SHIFT,
    IN_BLOCK,
    SharedBitmap,
    block_span,
    nblocks_for,
)
from xnbdd.backends.blocks import block_bytes, fill_edges, missing_edges, present_runs
from xnbdd.backends.file import FileBackend
from xnbdd.backends.rangelock import RangeLocks
from xnbdd.leftovers import remove_unless_locked, siblings, unlink_quietly

log = logging.getLogger("xnbdd")


class CowBackend:
    """Base image + overlay, shared by every connection of the instance."""

    def __init__(
        self,
        base: FileBackend,
        overlay: FileBackend,
        bitmap: SharedBitmap,
        overlay_path: str,
        *,
        owner: bool = True,
    ) -> None:
        self.base = base
        self.overlay = overlay
        self.bitmap = bitmap
        self.overlay_path = overlay_path
        self.bitmap_path = overlay_path + ".bm"
        self._size = base.size
        self._locks = RangeLocks()
        # the inline read of one block: its bit straight from the mapping, then its layer read
        # with one pread when both files are in memory (as FileBackend.try_read does)
        self._bits = bitmap.bits
        self._base_fd, self._overlay_fd = base.fd, overlay.fd
        self._pread_inline = base.memory_fs and overlay.memory_fs
        self._closed = False
        self.keep_overlay = False  # a handover: close without removing (docs/handover.md)
        self.owner = owner  # False in a worker process: the daemon removes the overlay

    @classmethod
    def open(cls, base_path: str, *, cow_dir: str | None = None) -> CowBackend:
        """Open ``base_path`` read-only and create a fresh overlay beside it (or in ``cow_dir``).

        Stale overlays of the same base (no live instance holds their lock) are removed first.
        """
        base = FileBackend.open(base_path, readonly=True)
        try:
            directory = cow_dir if cow_dir is not None else os.path.dirname(base_path) or "."
            prefix = os.path.join(directory, os.path.basename(base_path))
            remove_stale_overlays(prefix)
            overlay_path, fd = _create_locked_overlay(prefix, base.size)
        except BaseException:
            base.release()
            raise
        try:
            overlay = FileBackend(fd, overlay_path, readonly=False)
            bitmap = SharedBitmap.open(overlay_path + ".bm", nblocks_for(base.size), clear=True)
        except BaseException:
            unlink_quietly(overlay_path + ".bm")
            unlink_quietly(overlay_path)
            os.close(fd)
            base.release()
            raise
        log.info("copy-on-write overlay %s over %s", overlay_path, base_path)
        return cls(base, overlay, bitmap, overlay_path)

    @classmethod
    def adopt(cls, base_path: str, overlay_fd: int, overlay_path: str) -> CowBackend:
        """Go on with the overlay a previous process kept open for its clients (``overlay_fd``
        holds the overlay's lock). ValueError: it is not the file at ``overlay_path`` any more,
        or does not belong to this base; the caller then closes ``overlay_fd``."""
        base = FileBackend.open(base_path, readonly=True)
        try:
            held, there = os.fstat(overlay_fd), os.stat(overlay_path)
            if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
                raise ValueError(f"{overlay_path} is not the overlay that was kept")
            if held.st_size != base.size:
                raise ValueError(f"{overlay_path} is not an overlay of {base_path}")
            bitmap = SharedBitmap.open(overlay_path + ".bm", nblocks_for(base.size))
        except BaseException:
            base.release()
            raise
        overlay = FileBackend(overlay_fd, overlay_path, readonly=False)
        log.info(
            "copy-on-write overlay %s over %s kept across the restart", overlay_path, base_path
        )
        return cls(base, overlay, bitmap, overlay_path)

    @classmethod
    def attach(
        cls, base_fd: int, base_path: str, overlay_fd: int, overlay_path: str, bitmap_fd: int
    ) -> CowBackend:
        """The overlay a daemon opened, in one of its worker processes (the descriptors of
        ``descriptors()``, received from it; this object closes them)."""
        fds = [base_fd, overlay_fd, bitmap_fd]
        try:
            base = FileBackend(base_fd, base_path, readonly=True)
            fds.remove(base_fd)
            overlay = FileBackend(overlay_fd, overlay_path, readonly=False)
            fds.remove(overlay_fd)
            bitmap = SharedBitmap.attach(bitmap_fd, overlay_path + ".bm", nblocks_for(base.size))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(base, overlay, bitmap, overlay_path, owner=False)

    def descriptors(self) -> tuple[int, int, int]:
        """The base's, the overlay's and the bitmap's descriptors, for ``attach``."""
        return self.base.fd, self.overlay.fd, self.bitmap.fd

    # -- Backend protocol ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            readonly=False,
            trim=True,
            zero=True,
            fast_zero=self.overlay.capabilities.fast_zero,
            multi_conn=True,  # one overlay for every connection
            shared_by_processes=False,  # another instance makes its own overlay
        )

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        for start, stop, present in present_runs(self.bitmap, offset, length):
            source = self.overlay if present else self.base
            await source.read_into(view[start - offset : stop - offset], start)
        return buf

    # -- InlineIO: a connection's thread reads what needs no waiting, rewrites present blocks
    # without a lock, and writes absent ones (copy-up included) under the same cross-process
    # lock as ``write``, taken without waiting; the bitmap only ever gains bits, and a bit is
    # set only after its data is in the overlay, so what the thread sees is always a
    # consistent choice of source.

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        if (offset & IN_BLOCK) + length <= BLOCK_SIZE:  # one block, one source: small reads
            # Every 4 KiB read comes here, so as few Python operations as can be (a call or a
            # division here was a few per cent of the whole request): the 8 blocks of a bitmap
            # byte are mostly all present or all absent, which one comparison tells.
            byte = self._bits[offset >> BYTE_SHIFT]
            if byte == 0xFF or (byte and byte >> (offset >> BLOCK_SHIFT & 7) & 1):
                fd = self._overlay_fd
            else:
                fd = self._base_fd
            if self._pread_inline:
                data = os.pread(fd, length, offset)
                if len(data) == length:
                    return data
            return (self.overlay if fd == self._overlay_fd else self.base).try_read(offset, length)
        segments = present_runs(self.bitmap, offset, length)
        if len(segments) == 1:  # one source: it may send straight from its file
            return (self.overlay if segments[0][2] else self.base).try_read(offset, length)
        buf = bytearray(length)
        view = memoryview(buf)
        for start, stop, present in segments:
            source = self.overlay if present else self.base
            if not source.try_read_into(view[start - offset : stop - offset], start):
                return None
        return buf

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        length = len(data)
        first = offset // BLOCK_SIZE
        if (offset + length - 1) // BLOCK_SIZE == first:  # one block: its bit alone
            if self._bits[first >> 3] >> (first & 7) & 1:
                return self.overlay.try_write(offset, data)
            if length == BLOCK_SIZE:  # all of an absent block: nothing to copy up
                return self._try_write_block(offset, data, first)
            stop = first + 1
        else:
            first, stop = block_span(offset, length)
            if self.bitmap.all_set(first, stop):
                return self.overlay.try_write(offset, data)
        write = partial(self.overlay.try_write, offset, data)
        return self._try_write_absent(offset, length, first, stop, write)

    @property
    def takes_pipes(self) -> bool:
        """PipeSink: where the overlay does (a memory file system)."""
        return self.overlay.takes_pipes

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        """PipeSink: ``try_write`` with the payload spliced into the overlay."""
        first, stop = block_span(offset, length)
        if self.bitmap.all_set(first, stop):
            return self.overlay.try_write_piped(offset, length, payload)
        write = partial(self.overlay.try_write_piped, offset, length, payload)
        return self._try_write_absent(offset, length, first, stop, write)

    def _try_write_absent(
        self, offset: int, length: int, first: int, stop: int, write: Callable[[], bool]
    ) -> bool:
        """``write`` to blocks [first, stop), not all present, done at once where that needs no
        waiting: nobody holds their bitmap bytes (an OFD lock through a description of this
        thread's, ``SharedBitmap.try_lock_apart``, which excludes the event loop's ``_exclusive``
        and other processes alike), the partial edges to copy up can be read from the base at
        once, and the overlay takes the writes at once. Else nothing visible changed (no bit was
        set), and the event loop's ``write`` does it all again."""
        lo, hi = first & ~7, min((stop + 7) & ~7, self.bitmap.nblocks)
        lock_fd = self.bitmap.try_lock_apart(lo, hi)
        if lock_fd is None:
            return False
        try:
            for a, b in missing_edges(self.bitmap, offset, length, self._size):
                start, end = block_bytes(a, b, self._size)
                block = bytearray(end - start)
                if not self.base.try_read_into(memoryview(block), start):
                    return False
                if not self.overlay.try_write(start, block):
                    return False
            if not write():  # the payload, into the overlay
                return False
            self.bitmap.set_range(first, stop)  # only after the data is in the overlay
            return True
        finally:
            self.bitmap.unlock_apart(lock_fd, lo, hi)

    def _try_write_block(
        self, offset: int, data: bytes | bytearray | memoryview, block: int
    ) -> bool:
        """``_try_write_absent`` for a write of a whole block, the common first write: no edge
        to copy up, one bit to set, under the lock of its bitmap byte."""
        bitmap, index = self.bitmap, block >> 3
        lock_fd = bitmap.try_lock_bytes(index, 1)
        if lock_fd is None:
            return False
        try:
            if not self.overlay.try_write(offset, data):
                return False
            self._bits[index] |= 1 << (block & 7)  # only after the data is in the overlay
            return True
        finally:
            bitmap.unlock_bytes(lock_fd, index, 1)

    def is_hole(self, offset: int, length: int) -> bool:
        return False  # would need both layers' allocation; block_status answers that

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        first, last = block_span(offset, len(data))
        if self.bitmap.all_set(first, last):
            await self.overlay.write(offset, data, fua)
            return
        async with self._exclusive(first, last):
            await fill_edges(self.bitmap, offset, len(data), self._size, self._copy_up)
            await self.overlay.write(offset, data, fua=False)
            self.bitmap.set_range(first, last)  # only after the data is in the overlay
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Overlay data first, then the bitmap that covers it: every process's completed writes
        (both are synced as files, whoever wrote them)."""
        await self.overlay.flush()
        await trio.to_thread.run_sync(self.bitmap.sync)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Trimmed blocks read back as zeros, even where the base has data."""
        await self.zero(offset, length, may_trim=True, fast=False, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        if fast and not self.capabilities.fast_zero:
            raise OSError(errno.ENOTSUP, "the overlay's file system cannot zero quickly")
        first, last = block_span(offset, length)
        async with self._exclusive(first, last):
            await fill_edges(self.bitmap, offset, length, self._size, self._copy_up)
            # copied-up bytes are not visible until the bits are set: ENOTSUP here changes nothing
            await self.overlay.zero(offset, length, may_trim=may_trim, fast=fast, fua=False)
            self.bitmap.set_range(first, last)
        if fua:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        for start, stop, present in present_runs(self.bitmap, offset, length):
            await (self.overlay if present else self.base).cache(start, stop - start)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Overlay extents where blocks are present, base extents elsewhere, merged."""
        out: list[Extent] = []
        for start, stop, present in present_runs(self.bitmap, offset, length):
            source = self.overlay if present else self.base
            part = await source.block_status(start, stop - start)
            for extent in part:
                if out and (out[-1].hole, out[-1].zero) == (extent.hole, extent.zero):
                    out[-1] = Extent(out[-1].length + extent.length, extent.hole, extent.zero)
                else:
                    out.append(extent)
            if sum(e.length for e in part) < stop - start or len(out) >= MAX_EXTENTS:
                break  # a prefix is a valid answer
        return out[:MAX_EXTENTS]

    async def close(self) -> None:
        """Remove the overlay (it is throwaway by design) and release everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.owner:  # a worker's: the daemon's to keep or remove
            try:
                self.bitmap.close()
            finally:
                self.overlay.release()
                self.base.release()
            return
        if self.keep_overlay:  # its clients went to the fd store, and its descriptor with them
            try:
                self.bitmap.close()  # written back for the next process
            finally:
                self.overlay.release()
                await self.base.close()
            log.info("kept copy-on-write overlay %s for the clients", self.overlay_path)
            return
        unlink_quietly(self.bitmap_path)  # bitmap first: a .bm without .layer1 is always stale
        unlink_quietly(self.overlay_path)
        try:
            self.bitmap.close()
        finally:
            self.overlay.release()  # drops the lock; no sync, the file is gone
            await self.base.close()
        log.info("removed copy-on-write overlay %s", self.overlay_path)

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot_clone(self, dst_fd: int) -> bool:
        """Reflink the base into ``dst_fd``, then copy the overlay's present blocks over it
        (holes there become holes, i.e. zeros). False when the base cannot be reflinked.
        Called while no request runs (the daemon pauses them)."""
        if not self.base.snapshot_clone(dst_fd, self._size):
            return False
        for first, last in self.bitmap.runs(0, self.bitmap.nblocks, True):
            start, stop = block_bytes(first, last, self._size)
            linux.punch_or_zero(dst_fd, start, stop - start)
            self.overlay.copy_into(dst_fd, start, stop - start)
        return True

    def snapshot_runs(self, offset: int, length: int) -> Iterable[tuple[int, int]]:
        for start, stop, present in present_runs(self.bitmap, offset, length):
            yield from (self.overlay if present else self.base).snapshot_runs(start, stop - start)

    def snapshot_read(self, view: memoryview, offset: int) -> None:
        """What clients see: the bitmap's bits only go from clear to set, and only after the
        overlay holds the block, so either source read here is the block's content."""
        for start, stop, present in present_runs(self.bitmap, offset, len(view)):
            source = self.overlay if present else self.base
            source.snapshot_read(view[start - offset : stop - offset], start)

    def set_snapshot_guard(self, guard: ChangeGuard | None) -> None:
        """Every change clients can see is a change of the overlay file (the base is read-only;
        a copy-up writes what the base holds), so the overlay carries the guard."""
        self.overlay.set_snapshot_guard(guard)

    # -- helpers -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _exclusive(self, first: int, stop: int) -> AsyncIterator[None]:
        """Hold blocks [first, stop), and the others of their bitmap bytes, against every task
        of every process serving this overlay."""
        if first >= stop:
            yield  # no block: nothing to hold (an empty OFD lock would reach the file's end)
            return
        lo, hi = first & ~7, min((stop + 7) & ~7, self.bitmap.nblocks)
        async with self._locks.hold(lo, hi):  # first: one task per bitmap byte in a process
            if not self.bitmap.try_lock(lo, hi):
                await trio.to_thread.run_sync(self.bitmap.lock, lo, hi)
            try:
                yield
            finally:
                self.bitmap.unlock(lo, hi)

    async def _copy_up(self, first: int, stop: int) -> None:
        """Copy blocks [first, stop) from the base into the overlay (the caller holds them
        locked; their bits are set after the write that needed them)."""
        start, end = block_bytes(first, stop, self._size)
        data = await self.base.read(start, end - start)
        await self.overlay.write(start, data, fua=False)


def _create_locked_overlay(prefix: str, size: int) -> tuple[str, int]:
    """Create ``<prefix>.cow<N>.layer1`` for the lowest free N, already locked when it appears.

    The file is made and locked under a private name, then hard-linked to its final name
    (link never replaces an existing file), so no other instance can see it unlocked.
    """
    temp = f"{prefix}.cow-new.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, size)
        n = 0
        while True:
            path = f"{prefix}.cow{n}.layer1"
            try:
                os.link(temp, path)
                return path, fd
            except FileExistsError:
                n += 1
    except BaseException:
        os.close(fd)
        raise
    finally:
        unlink_quietly(temp)


_OVERLAY_NAME = re.compile(r"\.cow(?:(\d+)\.layer1(\.bm)?|-new\.\d+\.[0-9a-f]+)")


def remove_stale_overlays(prefix: str) -> list[str]:
    """Remove overlays of ``<prefix>`` that no live instance holds locked; returns their paths."""
    removed: list[str] = []
    for path, match in siblings(prefix, _OVERLAY_NAME):
        if match.group(2):  # a bitmap: stale once its data file is gone
            if os.path.lexists(path) and not os.path.lexists(path[: -len(".bm")]):
                unlink_quietly(path)
                log.warning("removed stale copy-on-write bitmap %s", path)
                removed.append(path)
            continue
        bitmap = (path + ".bm",) if match.group(1) is not None else ()
        if not remove_unless_locked(path, *bitmap):
            continue  # a live instance's overlay
        log.warning("removed stale copy-on-write overlay %s (left by an unclean exit)", path)
        removed.append(path)
    return removed
