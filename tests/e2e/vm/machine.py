"""A throwaway QEMU virtual machine for end-to-end tests with the Linux kernel NBD client.

The root filesystem is an ext4 image made from the cached debootstrap tree
(tests/e2e/build-rootfs.sh) with Debian packages installed into a copy of it; the VM boots that
tree's own Debian kernel under software emulation (TCG), has no network device, runs one test
script as a systemd unit and reports through a 9p shared folder. See
docs/testing.md ("Why the VM is set up as it is") for the reasons behind these choices.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
GUEST_DIR = "opt/xnbdd-e2e"
TEST_UNIT = "xnbd-e2e.service"


def build_deb(outdir: Path) -> Path:
    """Build this checkout's Debian package (scripts/build-deb.sh, which also runs lintian)."""
    out = subprocess.run(
        [str(REPO / "scripts/build-deb.sh"), str(outdir)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass(frozen=True)
class VmImage:
    kernel: Path
    initrd: Path
    root: Path


def build_image(tree: Path, workdir: Path, debs: list[Path], config: dict[str, str]) -> VmImage:
    """Copy the tree, install the packages and the test script into it, pack it as ext4.

    The cached tree itself is never modified. `config` becomes the guest's
    /opt/xnbdd-e2e/config (shell variable assignments read by e2e-in-vm.sh).
    """
    stage = workdir / "stage"
    subprocess.run(["cp", "-a", str(tree), str(stage)], check=True)
    try:
        if debs:
            guest_debs = stage / "var/tmp/debs"
            guest_debs.mkdir(parents=True)
            for deb in debs:
                shutil.copy(deb, guest_debs)
            names = [f"/var/tmp/debs/{deb.name}" for deb in debs]
            # dpkg's maintainer scripts must not start services in the build host's chroot.
            policy = stage / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            subprocess.run(
                ["chroot", str(stage), "dpkg", "-i", *names],
                check=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            policy.unlink()
            shutil.rmtree(guest_debs)
        for junk in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
            (stage / junk).unlink(missing_ok=True)
        (stage / "etc/hostname").write_text("xnbdd-vm\n")
        (stage / "etc/fstab").write_text(
            "/dev/vda / ext4 rw 0 1\n"
            "share /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0\n"
        )
        subprocess.run(
            ["chroot", str(stage), "passwd", "-d", "root"], check=True, stdout=subprocess.DEVNULL
        )
        (stage / "mnt/share").mkdir(parents=True, exist_ok=True)
        guest = stage / GUEST_DIR
        guest.mkdir(parents=True)
        shutil.copy(HERE / "e2e-in-vm.sh", guest)
        for deb in debs:  # the guest installs them again: an upgrade under a mounted client
            shutil.copy(deb, guest)
        lines = [f"{key}={_shell_quote(value)}\n" for key, value in config.items()]
        (guest / "config").write_text("".join(lines))
        shutil.copy(HERE / TEST_UNIT, stage / "etc/systemd/system")

        kernel = workdir / "vmlinuz"
        initrd = workdir / "initrd.img"
        shutil.copy(_only(stage / "boot", "vmlinuz-*"), kernel)
        shutil.copy(_only(stage / "boot", "initrd.img-*"), initrd)
        used_mib = int(
            subprocess.run(
                ["du", "-sm", str(stage)], check=True, stdout=subprocess.PIPE, text=True
            ).stdout.split()[0]
        )
        root = workdir / "root.img"
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "root",
                "-d",
                str(stage),
                str(root),
                f"{used_mib + 768}M",
            ],
            check=True,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return VmImage(kernel=kernel, initrd=initrd, root=root)


@dataclass(frozen=True)
class BootResult:
    returncode: int
    seconds: float
    result_log: str  # what the guest wrote to the share; empty if it never got that far
    serial_log: str


def boot(image: VmImage, share: Path, timeout: float) -> BootResult:
    """Boot the image, run the test unit, wait for the guest to power off (or the timeout)."""
    share.mkdir(parents=True, exist_ok=True)
    serial = share.parent / "serial.log"
    cmd = [
        "timeout",
        "--kill-after=10",
        str(int(timeout)),
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=3 mitigations=off "
        f"systemd.wants={TEST_UNIT}",
        "-drive",
        f"file={image.root},format=raw,if=virtio,cache=unsafe",
        "-virtfs",
        f"local,path={share},mount_tag=share,security_model=none,id=share",
    ]
    start = time.monotonic()
    with serial.open("wb") as log:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout + 30,
        )
    result = share / "result.log"
    return BootResult(
        returncode=proc.returncode,
        seconds=time.monotonic() - start,
        result_log=result.read_text(errors="replace") if result.exists() else "",
        serial_log=serial.read_text(errors="replace"),
    )


def _only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} in {directory}, found {found}")
    return found[0]


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
