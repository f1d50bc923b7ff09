"""Real loop devices and small file systems for tests (root only); always torn down."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MKFS = {
    "ext2": ["mkfs.ext2", "-q", "-F"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def require_loop() -> None:
    """Skip (with the reason) where loop devices cannot be used."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: loop devices unavailable in this environment")


def require_mkfs(fstype: str) -> None:
    require_loop()
    if shutil.which(MKFS[fstype][0]) is None:
        pytest.skip(f"{MKFS[fstype][0]} is not installed (make test installs it)")
    with open("/proc/filesystems") as f:
        if fstype not in f.read().split():
            pytest.skip(f"the running kernel has no {fstype} support")


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """A loop device over a sparse file of ``size`` bytes."""
    with open(backing, "wb") as f:
        f.truncate(size)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@contextmanager
def mounted_fs(workdir: Path, fstype: str, size: int) -> Iterator[Path]:
    """A fresh ``fstype`` file system of ``size`` bytes, mounted under ``workdir``."""
    require_mkfs(fstype)
    mountpoint = workdir / f"mnt-{fstype}"
    mountpoint.mkdir()
    with loop_device(workdir / f"{fstype}.img", size) as device:
        subprocess.run([*MKFS[fstype], device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mountpoint)], check=True, capture_output=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
