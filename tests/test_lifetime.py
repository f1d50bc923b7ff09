"""PidFile on its own: atomic, ours only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xnbdd.lifetime import PidFile


def test_written_whole_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    pid_file = PidFile(str(path))
    pid_file.write()
    assert path.read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pid"]  # no temporary left
    pid_file.remove()
    assert not path.exists()


def test_another_instances_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    pid_file = PidFile(str(path))
    pid_file.write()
    path.write_text("1\n")  # a newer instance took the path
    pid_file.remove()
    assert path.read_text() == "1\n"


def test_never_written_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    path.write_text(f"{os.getpid()}\n")
    PidFile(str(path)).remove()  # start-up failed before the file was ours
    assert path.exists()


def test_a_missing_directory_is_named_by_the_pid_file(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "x.pid"
    with pytest.raises(FileNotFoundError) as caught:
        PidFile(str(path)).write()
    assert caught.value.filename == str(path)
