"""Block presence bitmap in xNBD's on-disk format (docs/compat.md §4.2).

One bit per 4096-byte block; bit ``i`` is byte ``i // 8``, mask ``1 << (i % 8)`` -- the same bytes
as x86-64 little-endian 64-bit words, LSB first. The file is ``8 * ceil(nblocks / 64)`` bytes, no
header. Bits at positions >= nblocks stay zero.

The bits live in memory and reach the file only through ``sync`` (or ``write_back``): the proxy
must persist a bit only after the data it covers is durable (docs/decisions.md D14), so
persistence is explicit, never a side effect of setting a bit. Stdlib only.

``SharedBitmap`` is the other way, which the cow overlay opts into: the file itself mapped
MAP_SHARED, one set of bits for the daemon and its worker processes (docs/data-path.md).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from xnbdd.backends import ofdlock

BLOCK_SIZE = 4096

_CHUNK = 1 << 20  # bytes per step when counting bits
_NOT_ZERO = re.compile(b"[^\x00]")
_NOT_FULL = re.compile(b"[^\xff]")


def nblocks_for(size: int) -> int:
    """Blocks needed to cover ``size`` bytes (the last one may be partial)."""
    return -(-size // BLOCK_SIZE)


BLOCK_SHIFT = BLOCK_SIZE.bit_length() - 1  # byte offset >> this: its block
BYTE_SHIFT = BLOCK_SHIFT + 3  # byte offset >> this: the bitmap byte of its block
IN_BLOCK = BLOCK_SIZE - 1  # byte offset & this: where in its block


def block_span(offset: int, length: int) -> tuple[int, int]:
    """Blocks [first, stop) touched by the byte range ``offset``, ``length``."""
    return offset // BLOCK_SIZE, nblocks_for(offset + length)


def bitmap_file_size(nblocks: int) -> int:
    """Bytes of a bitmap file for ``nblocks`` bits: whole 64-bit words."""
    return 8 * -(-nblocks // 64)


@dataclass(frozen=True)
class PendingWrite:
    """Bitmap bytes captured for persistence: ``data`` belongs at byte ``offset`` of the file."""

    offset: int
    data: bytes


class Bitmap:
    """In-memory bitmap with explicit write-back to an optional file."""

    def __init__(
        self,
        nblocks: int,
        bits: bytearray | mmap.mmap,
        fd: int | None,
        path: str | None,
        readonly: bool,
    ) -> None:
        self.nblocks = nblocks
        self.path = path
        self.readonly = readonly
        self._bits = bits
        self.bits = bits  # read-only: the connections' threads test bits inline through it
        self._fd = fd
        self._dirty_lo = len(bits)  # dirty byte span [lo, hi); empty when lo >= hi
        self._dirty_hi = 0
        self._dirty_lock = threading.Lock()  # write_back may run in a worker thread

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def in_memory(cls, nblocks: int) -> Bitmap:
        """A bitmap with no file behind it; ``sync`` does nothing."""
        if nblocks < 0:
            raise ValueError(f"negative block count {nblocks}")
        return cls(nblocks, bytearray(bitmap_file_size(nblocks)), None, None, False)

    @classmethod
    def open(
        cls, path: str, nblocks: int, *, clear: bool = False, readonly: bool = False
    ) -> Bitmap:
        """Open (or create, mode 0600) the bitmap file at ``path`` for ``nblocks`` blocks.

        A new or empty file is sized and zeroed. An existing file of another size is refused
        with ValueError unless ``clear`` is given, which resizes and zeroes it (as does ``clear``
        on a file of the right size). ``readonly`` never creates, resizes or writes the file.
        """
        fd, fresh = _open_sized(path, nblocks, clear=clear, readonly=readonly)
        want = bitmap_file_size(nblocks)
        try:
            bits = bytearray(want) if fresh else _read_exact(fd, want, path)
        except BaseException:
            os.close(fd)
            raise
        bitmap = cls(nblocks, bits, fd, path, readonly)
        bitmap._mask_tail()
        return bitmap

    def _mask_tail(self) -> None:
        """Readers ignore bits past nblocks: drop them so count/runs never see them."""
        if self.nblocks % 8:
            self._bits[self.nblocks // 8] &= (1 << (self.nblocks % 8)) - 1
        tail_start = -(-self.nblocks // 8)
        if tail_start < len(self._bits):
            self._bits[tail_start:] = bytes(len(self._bits) - tail_start)

    # -- queries -----------------------------------------------------------------------------

    def test(self, block: int) -> bool:
        if not 0 <= block < self.nblocks:
            raise IndexError(f"block {block} outside bitmap of {self.nblocks} blocks")
        return bool(self._bits[block >> 3] >> (block & 7) & 1)

    def all_set(self, start: int, stop: int) -> bool:
        """True if every block in [start, stop) is set (vacuously true for an empty range)."""
        self._check(start, stop)
        return start >= stop or self._next_with(False, start, stop) >= stop

    def count(self) -> int:
        """Number of set bits."""
        bits = self._bits
        return sum(
            int.from_bytes(bits[i : i + _CHUNK], "little").bit_count()
            for i in range(0, len(bits), _CHUNK)
        )

    def runs(self, start: int, stop: int, value: bool) -> Iterator[tuple[int, int]]:
        """Maximal runs [a, b) within [start, stop) whose blocks all have ``value``."""
        self._check(start, stop)
        a = self._next_with(value, start, stop)
        while a < stop:
            b = self._next_with(not value, a, stop)
            yield a, b
            a = self._next_with(value, b, stop)

    def _next_with(self, value: bool, pos: int, stop: int) -> int:
        """First block in [pos, stop) whose bit equals ``value``, else ``stop``."""
        bits = self._bits
        while pos < stop and pos & 7:  # bit by bit up to a byte boundary
            if bool(bits[pos >> 3] >> (pos & 7) & 1) == value:
                return pos
            pos += 1
        if pos >= stop:
            return stop
        skip = _NOT_ZERO if value else _NOT_FULL  # bytes that cannot contain a match
        match = skip.search(bits, pos >> 3, -(-stop // 8))
        if match is None:
            return stop
        index = match.start()
        byte = bits[index] if value else ~bits[index] & 0xFF
        found = index * 8 + (byte & -byte).bit_length() - 1
        return min(found, stop)

    # -- updates -----------------------------------------------------------------------------

    def set_range(self, start: int, stop: int) -> None:
        """Set blocks [start, stop)."""
        self._fill(start, stop, True)

    def clear_range(self, start: int, stop: int) -> None:
        """Clear blocks [start, stop)."""
        self._fill(start, stop, False)

    def _fill(self, start: int, stop: int, value: bool) -> None:
        self._check(start, stop)
        if self.readonly:
            raise OSError(errno.EROFS, f"bitmap {self.path} is open read-only")
        if start >= stop:
            return
        bits = self._bits
        first, last = start >> 3, (stop - 1) >> 3
        if first == last:
            mask = ((1 << (stop - start)) - 1) << (start & 7)
            bits[first] = bits[first] | mask if value else bits[first] & ~mask
        else:
            head = (0xFF << (start & 7)) & 0xFF
            tail = (1 << ((stop - 1) & 7) + 1) - 1
            bits[first] = bits[first] | head if value else bits[first] & ~head
            bits[last] = bits[last] | tail if value else bits[last] & ~tail
            if last > first + 1:
                bits[first + 1 : last] = (b"\xff" if value else b"\x00") * (last - first - 1)
        with self._dirty_lock:
            self._dirty_lo = min(self._dirty_lo, first)
            self._dirty_hi = max(self._dirty_hi, last + 1)

    def _check(self, start: int, stop: int) -> None:
        if start < 0 or stop > self.nblocks or start > stop:
            raise IndexError(f"block range [{start}, {stop}) outside bitmap of {self.nblocks}")

    # -- persistence -------------------------------------------------------------------------

    def capture(self) -> PendingWrite | None:
        """Copy the bytes changed since the last capture, to persist later with ``write_back``.

        Cheap; call it in the event-loop thread at the moment that defines what gets persisted
        (e.g. before syncing the data the bits cover), then ``write_back`` in a worker thread.
        """
        with self._dirty_lock:
            lo, hi = self._dirty_lo, self._dirty_hi
            if self._fd is None or lo >= hi:
                self._dirty_lo, self._dirty_hi = len(self._bits), 0
                return None
            pending = PendingWrite(lo, bytes(self._bits[lo:hi]))
            self._dirty_lo, self._dirty_hi = len(self._bits), 0
        return pending

    def write_back(self, pending: PendingWrite | None) -> None:
        """Write captured bytes to the file and fdatasync it (blocking). On failure the range is
        marked dirty again, so a later sync retries it."""
        if pending is None or self._fd is None:
            return
        try:
            view = memoryview(pending.data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], pending.offset + done)
            os.fdatasync(self._fd)
        except BaseException:
            with self._dirty_lock:
                self._dirty_lo = min(self._dirty_lo, pending.offset)
                self._dirty_hi = max(self._dirty_hi, pending.offset + len(pending.data))
            raise

    def sync(self) -> None:
        """Persist every change made so far (blocking: write + fdatasync)."""
        self.write_back(self.capture())

    def close(self) -> None:
        """Persist outstanding changes and close the file. Idempotent."""
        if self._fd is None:
            return
        try:
            if not self.readonly:
                self.sync()
        finally:
            os.close(self._fd)
            self._fd = None

    def to_bytes(self) -> bytes:
        """The bitmap exactly as it is (or will be) in the file."""
        return bytes(self._bits)


class SharedBitmap(Bitmap):
    """The bitmap file mapped MAP_SHARED: every process that maps it sees a bit the moment
    another sets it, so the daemon and its workers share one truth.

    Made for the cow overlay, whose bits only go from clear to set, each after the overlay holds
    its block: a process that sees a bit reads the overlay, and finds the block there. Setting
    a bit rewrites its whole byte, so bits are set only under ``lock`` of their blocks (an OFD
    lock on the bitmap byte, which excludes other processes; within a process the caller keeps
    the locked ranges disjoint). The bits reach the disk with the file's pages, at any time, not
    after the data they cover: fine for an overlay, which never outlives a crash (a stale one is
    removed at start), and why the proxy, whose cache does, keeps ``Bitmap``. ``sync`` makes
    them durable (after the caller made the overlay durable).
    """

    def __init__(self, nblocks: int, fd: int, path: str) -> None:
        size = bitmap_file_size(nblocks)
        bits = mmap.mmap(fd, size, mmap.MAP_SHARED) if size else bytearray()
        self._lock_fd = ofdlock.own_description(fd, writable=True)
        self._spare_lock_fds: list[int] = []  # descriptions for ``try_lock_apart``, not in use
        super().__init__(nblocks, bits, fd, path, False)

    @classmethod
    def open(
        cls, path: str, nblocks: int, *, clear: bool = False, readonly: bool = False
    ) -> SharedBitmap:
        """As ``Bitmap.open`` (never read-only: a read-only overlay has no bitmap)."""
        if readonly:
            raise ValueError(f"bitmap {path}: a shared bitmap is never read-only")
        fd, _fresh = _open_sized(path, nblocks, clear=clear, readonly=False)
        try:
            bitmap = cls(nblocks, fd, path)
        except BaseException:
            os.close(fd)
            raise
        bitmap._mask_tail()
        return bitmap

    @classmethod
    def attach(cls, fd: int, path: str, nblocks: int) -> SharedBitmap:
        """Map the bitmap another process opened (``fd`` received from it; closed by ``close``)."""
        have, want = os.fstat(fd).st_size, bitmap_file_size(nblocks)
        if have != want:
            raise ValueError(f"bitmap {path} is {have} bytes, {nblocks} blocks need {want}")
        return cls(nblocks, fd, path)

    @property
    def fd(self) -> int:
        assert self._fd is not None, "closed"
        return self._fd

    # -- cross-process exclusion of the bytes holding blocks [first, stop) ---------------------

    def try_lock(self, first: int, stop: int) -> bool:
        return ofdlock.try_lock(self._lock_fd, first >> 3, _bytes_for(first, stop))

    def lock(self, first: int, stop: int) -> None:
        """Blocking (run it in a thread)."""
        ofdlock.lock(self._lock_fd, first >> 3, _bytes_for(first, stop))

    def unlock(self, first: int, stop: int) -> None:
        ofdlock.unlock(self._lock_fd, first >> 3, _bytes_for(first, stop))

    def try_lock_apart(self, first: int, stop: int) -> int | None:
        """``try_lock`` for a thread beside the event loop (a connection's data plane): through
        a description of its own, so the lock excludes this process's ``lock`` holders and
        other threads as well as other processes. Returns the description to pass to
        ``unlock_apart``; None: part of the range is held (nothing is held then)."""
        return self.try_lock_bytes(first >> 3, _bytes_for(first, stop))

    def unlock_apart(self, fd: int, first: int, stop: int) -> None:
        self.unlock_bytes(fd, first >> 3, _bytes_for(first, stop))

    def try_lock_bytes(self, index: int, count: int) -> int | None:
        """``try_lock_apart`` of the blocks of ``count`` bitmap bytes from byte ``index`` (a cow
        overlay's first write of a whole block takes its byte's lock straight from here)."""
        try:
            fd = self._spare_lock_fds.pop()  # list.pop and append are atomic: no lock needed
        except IndexError:
            fd = ofdlock.own_description(self.fd, writable=True)
        if ofdlock.try_lock(fd, index, count):
            return fd
        self._spare_lock_fds.append(fd)
        return None

    def unlock_bytes(self, fd: int, index: int, count: int) -> None:
        try:
            ofdlock.unlock(fd, index, count)
        finally:
            self._spare_lock_fds.append(fd)

    # -- persistence: the bits are the file's pages --------------------------------------------

    def capture(self) -> PendingWrite | None:
        return None  # nothing to copy: a copy written back later could clear newer bits

    def write_back(self, pending: PendingWrite | None) -> None:
        pass

    def sync(self) -> None:
        """Blocking: make every bit set so far, by any process, durable."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        """Make the bits durable, unmap and close. Idempotent."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            if isinstance(self._bits, mmap.mmap):
                self._bits.close()
            os.close(self._lock_fd)
            while self._spare_lock_fds:
                os.close(self._spare_lock_fds.pop())
            os.close(self._fd)
            self._fd = None


def _bytes_for(first: int, stop: int) -> int:
    """Bytes of the bitmap that hold blocks [first, stop) (at least one: a lock of length 0
    would reach to the end of the file)."""
    return max(((stop - 1) >> 3) - (first >> 3) + 1, 1)


def _open_sized(path: str, nblocks: int, *, clear: bool, readonly: bool) -> tuple[int, bool]:
    """Open (or create, mode 0600) the bitmap file for ``nblocks`` blocks; True with it when the
    file was (re)made all zeros. See ``Bitmap.open``."""
    if nblocks < 0:
        raise ValueError(f"negative block count {nblocks}")
    want = bitmap_file_size(nblocks)
    if readonly:
        if clear:
            raise ValueError(f"bitmap {path}: cannot clear a bitmap opened read-only")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        have = os.fstat(fd).st_size
        if have != want and not clear and not (have == 0 and not readonly):
            raise ValueError(
                f"bitmap {path} is {have} bytes, but {nblocks} blocks need {want} bytes "
                "(wrong bitmap for this image? clear it to start over)"
            )
        if clear or have != want:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, want)
            os.fsync(fd)
            return fd, True
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _read_exact(fd: int, size: int, path: str) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise OSError(errno.EIO, f"bitmap {path}: file shrank while reading it")
        done += n
    return buf
