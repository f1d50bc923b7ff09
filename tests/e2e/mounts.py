"""A small tmpfs mounted for one test: a real file system that fills up (ENOSPC) or holds an
image that a test truncates under a live server."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """``mount -t tmpfs -o size=SIZE`` on ``path`` (created); unmounted afterwards."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError("mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
