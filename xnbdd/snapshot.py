"""Point-in-time copies of an image (SIGUSR1 and the control socket; docs/compat.md §4.4, §5).

A snapshot holds every write answered before its point and none after. The point costs clients a
moment: the daemon pauses requests, lets those in flight finish and calls ``LiveSnapshot.begin``,
which either reflinks the image (FICLONE, where the file system can share extents) or installs a
``WriteGuard`` on the source; then requests go on. Without a reflink the copy is made in the
background by ``LiveSnapshot.finish``: the guard copies a range's old content into the snapshot
before anything changes it (writes, trims and zeroes, inline ones from a connection's thread
included), and the copier skips what the guard already saved (docs/data-path.md).

The copy is written under ``<image>.snapshot.<T>.partial`` (created exclusively, mode 0600,
flock()ed while it is written), fsynced, hard-linked to ``<image>.snapshot.<T>`` (a link never
replaces an existing file, so an existing snapshot is refused, not overwritten), and the
directory is fsynced. A failure removes the partial file; a crash leaves it, and the next start
removes it (``remove_partial_snapshots``). The image itself never depends on the snapshot: a
snapshot that fails midway lets every write through.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from xnbdd.backends import linux
from xnbdd.backends.base import ChangeGuard
from xnbdd.leftovers import remove_unless_locked, siblings, unlink_quietly

log = logging.getLogger("xnbdd")

GRAIN = 64 * 1024  # the guard's unit: a change copies at most this much around it first
CHUNK = 32 << 20  # the copier's step: one worker-thread call, few GIL hand-overs per MiB
PRESERVE_PIECE = 4 << 20  # the guard copies a large change's old bytes in pieces this large
PARTIAL = ".partial"


@dataclass(frozen=True)
class SnapshotResult:
    path: str
    size: int
    method: str  # "reflink" or "copy"
    seconds: float  # from the point to the durable file


class SnapshotSource(Protocol):
    """What clients see, as a snapshot reads it (FileBackend, CowBackend). Blocking methods."""

    @property
    def size(self) -> int: ...

    def snapshot_clone(self, dst_fd: int) -> bool:
        """Reflink what clients see into the empty file ``dst_fd``; False (nothing written)
        when the file system cannot share extents. Called while no request runs."""
        ...

    def snapshot_runs(self, offset: int, length: int) -> Iterable[tuple[int, int]]:
        """(start, stop) runs of [offset, offset + length) that may hold data; elsewhere zeros."""
        ...

    def snapshot_read(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with what clients see at ``offset``."""
        ...

    def set_snapshot_guard(self, guard: ChangeGuard | None) -> None:
        """Call ``guard.preserve`` before any change to what clients see (None: stop)."""
        ...


def snapshot_path(image_path: str, now: float) -> str:
    """``<image>.snapshot.<T>``, T in decimal seconds zero-padded to at least 8 digits."""
    return f"{image_path}.snapshot.{int(now):08d}"


class WriteGuard:
    """The snapshot point, held while the copy runs: ``done`` marks the grains the snapshot
    file already has as they were at the point. A grain is marked by a change's ``preserve``
    only after its old bytes are written, and by the copier before (it holds them in memory),
    so a lock-free look at ``done`` is safe for writers: marks only ever go from 0 to 1."""

    def __init__(self, source: SnapshotSource, dst_fd: int, size: int) -> None:
        self._source = source
        self._dst = dst_fd
        self.size = size
        self._done = bytearray(-(-size // GRAIN))
        self._lock = threading.Lock()  # changes preserving, the copier claiming
        self.failed: OSError | None = None  # then nothing is preserved any more
        self.preserved = 0  # bytes copied ahead of the copier by changes
        self._buffer = bytearray()

    def _grains(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        return offset // GRAIN, -(-end // GRAIN)

    def covered(self, offset: int, length: int) -> bool:
        """Nothing to preserve for this range (it is in the snapshot, or the snapshot failed)."""
        first, stop = self._grains(offset, length)
        return self.failed is not None or first >= stop or self._done.find(0, first, stop) < 0

    def preserve(self, offset: int, length: int) -> None:
        """Blocking: copy what the snapshot lacks of the range, before the range changes. A
        failure (a full disk) fails the snapshot, never the client's write. The lock is held
        for one piece at a time: a huge TRIM does not hold up other writers for long."""
        first, stop = self._grains(offset, length)
        pos = first
        while pos < stop:
            with self._lock:
                if self.failed is not None:
                    return
                pos = self._done.find(0, pos, stop)
                if pos < 0:
                    return
                end = self._done.find(1, pos, stop)
                end = min(stop if end < 0 else end, pos + PRESERVE_PIECE // GRAIN)
                start, until = pos * GRAIN, min(end * GRAIN, self.size)
                try:
                    for a, b in self._source.snapshot_runs(start, until - start):
                        buf = bytearray(b - a)
                        self._source.snapshot_read(memoryview(buf), a)
                        linux.write_all(self._dst, buf, a)
                except OSError as err:
                    self.failed = err
                    return
                self._done[pos:end] = b"\x01" * (end - pos)
                self.preserved += until - start
            pos = end

    def close(self) -> None:
        """Blocking: no ``preserve`` runs or starts any more (the snapshot file may close)."""
        with self._lock:
            if self.failed is None:
                self.failed = OSError(errno.ECANCELED, "the snapshot is over")

    def copy_step(self, start: int, stop: int) -> None:
        """Blocking, the copier: bring [start, stop) (grain-aligned) into the snapshot, except
        grains a change preserved already. The bytes are read before the grains are claimed:
        a grain whose bytes changed since was preserved, hence marked, before the change."""
        if self.failed is not None:
            raise self.failed
        try:
            self._copy_step(start, stop)
        except OSError as err:
            self.failed = err  # the changes stop preserving
            raise

    def _copy_step(self, start: int, stop: int) -> None:
        if len(self._buffer) < stop - start:
            self._buffer = bytearray(stop - start)  # one for the copier, reused: no page faults
        chunk = memoryview(self._buffer)
        runs = list(self._source.snapshot_runs(start, stop - start))
        for a, b in runs:
            self._source.snapshot_read(chunk[a - start : b - start], a)
        first, last = self._grains(start, stop - start)
        with self._lock:
            claimed = _zero_runs(self._done, first, last)
            for a, b in claimed:
                self._done[a:b] = b"\x01" * (b - a)
        for ga, gb in claimed:
            lo, hi = ga * GRAIN, min(gb * GRAIN, self.size)
            for a, b in runs:
                s, e = max(lo, a), min(hi, b)
                if s < e:
                    linux.write_all(self._dst, chunk[s - start : e - start], s)
        failed = self.failed
        if failed is not None:  # a change failed to preserve meanwhile
            raise failed


def _zero_runs(marks: bytearray, first: int, stop: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = first
    while (pos := marks.find(0, pos, stop)) >= 0:
        end = marks.find(1, pos, stop)
        end = stop if end < 0 else end
        out.append((pos, end))
        pos = end
    return out


Progress = Callable[[int, int], None]  # (bytes copied, total)


class LiveSnapshot:
    """One snapshot being taken: ``begin`` at the point (requests paused), ``finish`` after."""

    def __init__(self, image_path: str, source: SnapshotSource, now: float | None = None) -> None:
        self.image_path = image_path
        self.source = source
        self.path = snapshot_path(image_path, time.time() if now is None else now)
        self.partial = self.path + PARTIAL
        self.size = source.size
        self.method = ""
        self.copied = 0  # bytes the copier has passed
        self.guard: WriteGuard | None = None
        self._fd: int | None = None
        self._started = 0.0

    def describe(self) -> str:
        if not self.method:
            return "snapshot: taking the point"
        if self.method == "reflink":
            return f"snapshot {self.path}: reflinked, syncing"
        percent = 100.0 * self.copied / max(self.size, 1)
        return f"snapshot {self.path}: {percent:.0f}% copied in the background"

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "partial": self.partial,
            "method": self.method,
            "copied": self.copied,
            "total": self.size,
        }

    async def begin(self) -> None:
        """Fix the point: call while no request runs and none starts. Reflinks the whole image
        where the file system can, else installs the write guard for the background copy."""
        await trio.to_thread.run_sync(self._begin)

    def _begin(self) -> None:
        self._started = time.monotonic()
        if os.path.lexists(self.path):
            raise FileExistsError(
                errno.EEXIST, f"snapshot {self.path} already exists, not overwriting it"
            )
        try:
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._failure(e) from e
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # live: start-up leaves it alone
            if self.source.snapshot_clone(fd):
                self.method = "reflink"
                return
            os.ftruncate(fd, self.size)
        except OSError as e:
            self._discard()
            raise self._failure(e) from e
        self.method = "copy"
        self.guard = WriteGuard(self.source, fd, self.size)
        self.source.set_snapshot_guard(self.guard)

    async def finish(
        self, progress: Progress | None = None, rate: int = 0, step: int = CHUNK
    ) -> SnapshotResult:
        """Copy what the guard has not, ``step`` bytes at a time (``rate``: at most that many
        bytes per second, 0: no limit), make it durable and give it its name. On failure or
        cancellation the partial file is removed and the guard taken away: clients never
        notice."""
        assert self._fd is not None, "begin first"
        assert step > 0 and step % GRAIN == 0, "copy steps claim whole grains"
        fd = self._fd
        try:
            guard = self.guard
            if guard is not None:
                pace = trio.current_time()
                for start in range(0, self.size, step):
                    stop = min(start + step, self.size)
                    await trio.to_thread.run_sync(guard.copy_step, start, stop)
                    self.copied = stop
                    if progress is not None:
                        progress(stop, self.size)
                    if rate:
                        pace += (stop - start) / rate
                        await trio.sleep_until(pace)
                    else:
                        await trio.lowlevel.checkpoint()
            await trio.to_thread.run_sync(self._publish, fd)
        except OSError as e:
            raise self._failure(e) from e
        finally:
            with trio.CancelScope(shield=True):
                await self.abandon()
        return SnapshotResult(self.path, self.size, self.method, time.monotonic() - self._started)

    async def abandon(self) -> None:
        """Release the source and remove the partial file if it is still there (after
        ``begin``; ``finish`` calls it too). Idempotent."""
        guard = self.guard
        if guard is not None:
            self.source.set_snapshot_guard(None)
            # a change that took the guard before may be preserving into the file right now
            await trio.to_thread.run_sync(guard.close)
        self._discard()

    def _publish(self, fd: int) -> None:
        os.fsync(fd)
        _publish(self.partial, self.path)
        _fsync_directory(os.path.dirname(self.path) or ".")

    def _discard(self) -> None:
        """Remove the partial file (if still there) and close it."""
        if self._fd is None:
            return
        unlink_quietly(self.partial)
        os.close(self._fd)
        self._fd = None

    def _failure(self, e: OSError) -> OSError:
        reason = e.strerror or str(e)
        return OSError(e.errno, f"snapshot of {self.image_path} to {self.path} failed: {reason}")


async def take_snapshot(
    image_path: str,
    src_fd: int | None = None,
    *,
    now: float | None = None,
    source: SnapshotSource | None = None,
) -> SnapshotResult:
    """Snapshot ``image_path`` next to it with nothing else writing to it (offline, tests).

    The content comes from ``source`` when given (a backend: base + overlay for cow-target),
    else from ``src_fd`` (an open image), else from ``image_path`` opened read-only. Block
    devices are copied over the device's size.
    """
    if source is not None:
        live = LiveSnapshot(image_path, source, now)
        await live.begin()
        return await live.finish()
    result: SnapshotResult = await trio.to_thread.run_sync(
        _take_snapshot, image_path, src_fd, time.time() if now is None else now
    )
    return result


def _take_snapshot(image_path: str, src_fd: int | None, now: float) -> SnapshotResult:
    started = time.monotonic()
    final = snapshot_path(image_path, now)
    temp = final + PARTIAL
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, f"snapshot {final} already exists, not overwriting it")
    own_fd: int | None = None
    created = False
    try:
        if src_fd is None:
            own_fd = src_fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
        os.fdatasync(src_fd)
        size = linux.file_size(src_fd)
        dst = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        try:
            fcntl.flock(dst, fcntl.LOCK_EX | fcntl.LOCK_NB)
            method = linux.clone_or_copy(src_fd, dst, size)
            os.fsync(dst)
            _publish(temp, final)
            created = False
        finally:
            if created:
                unlink_quietly(temp)
            os.close(dst)
        _fsync_directory(os.path.dirname(final) or ".")
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(e.errno, f"snapshot of {image_path} to {final} failed: {reason}") from e
    finally:
        if own_fd is not None:
            os.close(own_fd)
    return SnapshotResult(final, size, method, time.monotonic() - started)


_PARTIAL_NAME = re.compile(r"\.snapshot\.\d{8,}\.partial")


def remove_partial_snapshots(image_path: str) -> list[str]:
    """Remove ``<image>.snapshot.<T>.partial`` files no live server is writing (none holds
    their lock): what a crash during a background copy left. Returns their paths."""
    removed: list[str] = []
    for path, _match in siblings(image_path, _PARTIAL_NAME):
        try:
            if not remove_unless_locked(path):
                continue  # another server is writing it
        except OSError as err:
            log.warning("cannot remove the unfinished snapshot %s: %s", path, err.strerror)
            continue
        log.warning("removed the unfinished snapshot %s (its copy was cut by a crash)", path)
        removed.append(path)
    return removed


def _publish(temp: str, final: str) -> None:
    """Give the finished copy its final name without ever replacing an existing file."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, f"snapshot {final} appeared meanwhile, not overwriting it"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        # no hard links on this file system: check, then rename (not atomic against a racer)
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, f"snapshot {final} already exists") from None
        os.rename(temp, final)
        return
    os.unlink(temp)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
