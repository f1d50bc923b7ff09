"""Byte-range locks that exclude other processes: open file description (OFD) locks.

A lock belongs to the open file description it was taken through, not to the process (as
``lockf`` locks do), so every process must take its locks through a description of its own --
a descriptor received over SCM_RIGHTS shares the sender's description, and would share its
locks. ``own_description`` opens one. Locks of one description do not exclude each other: the
caller keeps the ranges it locks disjoint within a process (cow.py holds its in-process range
lock over the same range first).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks); native alignment
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def own_description(fd: int, writable: bool) -> int:
    """A new open file description of the file behind ``fd`` (even when it has been removed)."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    return os.open(f"/proc/self/fd/{fd}", flags)


def try_lock(fd: int, start: int, length: int) -> bool:
    """Take a write lock on bytes [start, start + length) at once; False if another description
    holds part of it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, start, length))
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock(fd: int, start: int, length: int) -> None:
    """Blocking: wait for, then take, a write lock on bytes [start, start + length)."""
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, start, length))
            return
        except InterruptedError:
            continue


def unlock(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, start, length))
