"""The Linux kernel NBD client against xnbdd installed from its Debian package, in a QEMU VM.

One boot serves every test here (about a minute under software emulation): the package built
from this checkout is installed into a copy of the cached Debian tree, systemd starts
xnbd@disk.service, and the guest script (tests/e2e/vm/e2e-in-vm.sh) attaches /dev/nbdX, makes
an ext4 filesystem, writes files, reconnects and checks them, then reports step by step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.rootfs import rootfs
from tests.e2e.vm.machine import REPO, BootResult, boot, build_deb, build_image

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

BOOT_TIMEOUT = 420  # seconds for boot + test + poweroff; a healthy run takes 45-90 s
TOOLS = ["qemu-system-x86_64", "debootstrap", "mkfs.ext4", "dpkg-buildpackage", "lintian"]

# What the guest is told about the export (e2e-in-vm.sh reads these from its config file).
GUEST_CONFIG = {
    "UNIT": "xnbd@disk.service",
    "IMAGE": "/var/lib/xnbd/disk.img",
    "PORT": "8520",
    "EXPORT": "disk",
    "PROXY_PORT": "8521",
}


@dataclass(frozen=True)
class VmRun:
    deb: Path  # the package that was installed into the guest
    boot: BootResult
    steps: dict[str, str]  # step name -> "ok" | "FAIL", in the order the guest ran them

    def explain(self) -> str:
        return (
            f"guest exit {self.boot.returncode} after {self.boot.seconds:.0f} s\n"
            f"--- result.log\n{self.boot.result_log}\n"
            f"--- serial log (tail)\n{self.boot.serial_log[-3000:]}"
        )


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmRun]:
    if os.geteuid() != 0:
        pytest.skip("the VM test needs root (debootstrap, chroot, dpkg)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools (make test installs them): {', '.join(missing)}")
    work = tmp_path_factory.mktemp("vm")
    try:
        deb = build_deb(work / "deb")
        image = build_image(rootfs(), work, [deb], GUEST_CONFIG)
        result = boot(image, work / "share", timeout=BOOT_TIMEOUT)
        image.root.unlink()
        steps = dict(re.findall(r"^STEP (\S+) (ok|FAIL)$", result.result_log, re.MULTILINE))
        yield VmRun(deb=deb, boot=result, steps=steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the root image alone is ~1.7 GB (sparse)


def expect(run: VmRun, *names: str) -> None:
    assert "VM_UP" in run.boot.result_log, "the guest never ran its test\n" + run.explain()
    assert "E2E_DONE" in run.boot.result_log, "the guest test did not finish\n" + run.explain()
    bad = {n: run.steps.get(n, "not reached") for n in names if run.steps.get(n) != "ok"}
    assert not bad, f"guest steps failed: {bad}\n" + run.explain()


def test_vm_reference_server_works(vm_run: VmRun) -> None:
    """Debian's nbd-server with the same kernel client: proves the VM itself is sound."""
    expect(vm_run, "modprobe", "reference")


def test_kernel_client_ext4_roundtrip(vm_run: VmRun) -> None:
    expect(
        vm_run,
        "unit_start",
        "attach",
        "mkfs",
        "write",
        "restart_mounted",
        "upgrade_mounted",
        "detach",
        "reattach",
        "fsck",
        "readback",
        "image_has_data",
    )


def test_journal_shows_the_connection(vm_run: VmRun) -> None:
    expect(vm_run, "unit_start", "attach", "journal_connection")


def test_proxy_switch_with_mounted_filesystem(vm_run: VmRun) -> None:
    if "PROXY_UNAVAILABLE" in vm_run.boot.result_log:
        pytest.skip("package lacks xnbdd.backends.proxy or xnbd-bgctl (proxy mode not built yet)")
    expect(
        vm_run,
        "proxy_start",
        "proxy_attach",
        "proxy_mount",
        "proxy_cache_all",
        "proxy_usr2",
        "origin_stop",
        "proxy_after_switch",
    )


def test_package_ships_programs_man_pages_units_and_config(vm_run: VmRun) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(vm_run.deb)], check=True, capture_output=True, text=True
    ).stdout
    files = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    wanted = {f"/usr/bin/{prog}" for prog in scripts}
    wanted |= {f"/usr/share/man/man8/{prog}.8.gz" for prog in scripts}
    wanted |= {f"/lib/systemd/system/{unit.name}" for unit in (REPO / "units").iterdir()}
    wanted |= {f"/etc/xnbd/{conf.name}" for conf in (REPO / "etc/xnbd").iterdir()}
    assert wanted <= files, f"missing from the package: {sorted(wanted - files)}"

    def field(name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "--field", str(vm_run.deb), name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    depends = field("Depends")
    for debian_package in ("python3-trio", "python3-systemd"):
        assert debian_package in depends
    assert "sdnotify" not in depends  # sd_notify is python3-systemd's (xnbdd/systemd.py)
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(vm_run.deb), "conffiles"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "/etc/xnbd/example.conf" in conffiles
