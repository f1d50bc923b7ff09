"""ROTATIONAL detection on this machine's own sysfs and devices, and the flag as nbdinfo sees it
with the override."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serverproc import running_server
from xnbdd.rotational import device_rotational, is_rotational

SYS_BLOCK = Path("/sys/block")


def kernel_says(disk: str) -> bool:
    return (SYS_BLOCK / disk / "queue" / "rotational").read_text().strip() == "1"


def disks() -> list[str]:
    return sorted(d.name for d in SYS_BLOCK.iterdir() if Path("/dev", d.name).exists())


def test_every_block_device_of_this_machine_as_the_kernel_says() -> None:
    found = disks()
    if not found:
        pytest.skip("no block device nodes in /dev")
    for disk in found:
        assert is_rotational(f"/dev/{disk}") is kernel_says(disk), disk


def test_a_file_answers_for_the_disk_under_its_file_system(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    node = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not node.exists():
        pytest.skip(f"{tmp_path} is on a file system without a block device (tmpfs?)")
    disk = node.resolve()
    if (disk / "partition").exists():
        disk = disk.parent
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    assert is_rotational(str(image)) is kernel_says(disk.name)


def test_no_block_device_is_not_rotational() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    assert is_rotational(str(shm)) is False  # tmpfs: an anonymous device sysfs does not know
    assert device_rotational(0, 1) is None
    assert is_rotational("/nonexistent/image") is False


def test_a_partition_answers_for_its_disk(tmp_path: Path) -> None:
    """The kernel here scans no partition tables on loop devices (no partition appears), so the
    sysfs shape of a partition is built as the kernel lays it out: the partition's directory
    inside its disk's, with no queue of its own."""
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "pci0000:00" / "block" / "sda"
    (disk / "queue").mkdir(parents=True)
    (disk / "sda1").mkdir()
    (disk / "sda1" / "partition").write_text("1\n")
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / "8:0").symlink_to(disk)
    (sysfs / "dev" / "block" / "8:1").symlink_to(disk / "sda1")
    for value in ("0", "1"):
        (disk / "queue" / "rotational").write_text(value + "\n")
        assert device_rotational(8, 1, sysfs) is (value == "1")
        assert device_rotational(8, 0, sysfs) is (value == "1")
    assert device_rotational(8, 2, sysfs) is None


@pytest.mark.parametrize(("flag", "expected"), [("--rotational", True), ("--no-rotational", False)])
def test_override_as_nbdinfo_sees_it(tmp_path: Path, flag: str, expected: bool) -> None:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo (libnbd-bin) is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    with running_server("--target", str(image), flag, tmp_path=tmp_path) as srv:
        out = subprocess.run(
            ["nbdinfo", "--json", srv.uri], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    assert json.loads(out)["exports"][0]["is_rotational"] is expected
