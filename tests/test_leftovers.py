"""Leftover files (``xnbdd/leftovers.py``): a file a live process holds locked stays, one
nobody holds goes, with the files named beside it."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from xnbdd.leftovers import remove_unless_locked, siblings


def test_siblings_match_the_whole_suffix(tmp_path: Path) -> None:
    for name in ("disk.img", "disk.img.p1", "disk.img.p22", "disk.img.p3x", "other.img.p4"):
        (tmp_path / name).write_bytes(b"")
    found = [
        (Path(path).name, m.group(1))
        for path, m in siblings(str(tmp_path / "disk.img"), re.compile(r"\.p(\d+)"))
    ]
    assert found == [("disk.img.p1", "1"), ("disk.img.p22", "22")]


def test_a_locked_file_stays_and_an_unlocked_one_goes_with_its_companion(tmp_path: Path) -> None:
    live, dead, companion = tmp_path / "live", tmp_path / "dead", tmp_path / "dead.bm"
    for path in (live, dead, companion):
        path.write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: as another process
        assert not remove_unless_locked(str(live))
        assert live.exists()
    finally:
        os.close(fd)
    assert remove_unless_locked(str(dead), str(companion))
    assert not dead.exists() and not companion.exists()
    assert not remove_unless_locked(str(dead))  # already gone
