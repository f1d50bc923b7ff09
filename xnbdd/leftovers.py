"""Files an unclean exit leaves next to an image, and how to tell them from a live server's.

A cow-target's overlay and a background snapshot's ``.partial`` copy are held under an exclusive
``flock`` by the process writing them. A file of that kind nobody holds locked was left by a
crash and may go; one that is locked belongs to a server that is still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def siblings(prefix: str, suffix: re.Pattern[str]) -> Iterator[tuple[str, re.Match[str]]]:
    """Paths named ``prefix`` followed by what ``suffix`` matches whole, in name order."""
    directory, name = os.path.split(prefix)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return
    for entry in sorted(names):
        if entry.startswith(name) and (match := suffix.fullmatch(entry, len(name))):
            yield os.path.join(directory, entry), match


def remove_unless_locked(path: str, *with_it: str) -> bool:
    """Remove ``path`` (and ``with_it`` first) unless a live process holds its lock: True when
    removed, False when it is locked or already gone. OSError when the removal fails."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        for other in with_it:
            unlink_quietly(other)
        unlink_quietly(path)
        return True
    finally:
        os.close(fd)
