"""Point-in-time copies of an image (SIGUSR1 and the control socket; docs/compat.md §4.4, §5).

Only the mechanics: the daemon pauses requests, lets in-flight writes finish, calls
``take_snapshot`` and resumes. The copy is a reflink (FICLONE) where the file system can share
extents, else a copy that keeps holes. It is written under ``<name>.tmp``, fsynced, hard-linked to
``<image>.snapshot.<epoch seconds>`` (a link never replaces an existing file, so an existing
snapshot is refused, not overwritten), and the directory is fsynced. On any failure the temporary
file is removed and OSError says what failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from xnbdd.backends import linux


@dataclass(frozen=True)
class SnapshotResult:
    path: str
    size: int
    method: str  # "reflink" or "copy"
    seconds: float


class SnapshotSource(Protocol):
    """Something that can write what clients see into a file (CowBackend, FileBackend)."""

    @property
    def size(self) -> int: ...

    def snapshot_into(self, dst_fd: int) -> str:
        """Blocking: fill the empty regular file ``dst_fd``; return "reflink" or "copy"."""
        ...


def snapshot_path(image_path: str, now: float) -> str:
    """``<image>.snapshot.<T>``, T in decimal seconds zero-padded to at least 8 digits."""
    return f"{image_path}.snapshot.{int(now):08d}"


async def take_snapshot(
    image_path: str,
    src_fd: int | None = None,
    *,
    now: float | None = None,
    source: SnapshotSource | None = None,
) -> SnapshotResult:
    """Snapshot ``image_path`` next to it, in a worker thread.

    The content comes from ``source`` when given (cow-target: base + overlay), else from
    ``src_fd`` (the daemon's open image; fdatasynced first), else from ``image_path`` opened
    read-only. Block devices are copied over the device's size.
    """
    result: SnapshotResult = await trio.to_thread.run_sync(
        _take_snapshot, image_path, src_fd, time.time() if now is None else now, source
    )
    return result


def _take_snapshot(
    image_path: str, src_fd: int | None, now: float, source: SnapshotSource | None
) -> SnapshotResult:
    started = time.monotonic()
    final = snapshot_path(image_path, now)
    temp = final + ".tmp"
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, f"snapshot {final} already exists, not overwriting it")
    own_fd: int | None = None
    created = False
    try:
        if source is None and src_fd is None:
            own_fd = src_fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
        if source is None:
            assert src_fd is not None
            os.fdatasync(src_fd)
            size = linux.file_size(src_fd)
        else:
            size = source.size
        dst = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        try:
            if source is not None:
                method = source.snapshot_into(dst)
            else:
                assert src_fd is not None
                method = linux.clone_or_copy(src_fd, dst, size)
            os.fsync(dst)
        finally:
            os.close(dst)
        _publish(temp, final)
        created = False
        _fsync_directory(os.path.dirname(final) or ".")
    except OSError as e:
        if created:
            _remove(temp)
        reason = e.strerror or str(e)
        raise OSError(e.errno, f"snapshot of {image_path} to {final} failed: {reason}") from e
    finally:
        if own_fd is not None:
            os.close(own_fd)
    return SnapshotResult(final, size, method, time.monotonic() - started)


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


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
