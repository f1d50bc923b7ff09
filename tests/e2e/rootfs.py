"""The cached Debian trees for the systemd-nspawn, QEMU and newest-client tests (build-rootfs.sh).

bookworm (Debian 12, the default) has a kernel, systemd and the NBD tools; trixie (Debian 13)
has today's clients and peers (libnbd 1.22, qemu 10, nbdkit 1.42) and the Debian tool chain.
The first call on a host runs debootstrap (a few minutes, serialised by a lock, keyed by the hash
of build-rootfs.sh and the suite); later calls return the cached path at once. Callers never
modify a tree: nspawn runs it with --volatile=overlay, the VM test copies it.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-rootfs.sh"


def missing_builders() -> list[str]:
    """Host tools build-rootfs.sh needs that are not installed (apt: debootstrap)."""
    return [tool for tool in ("debootstrap", "flock", "sha256sum") if shutil.which(tool) is None]


@cache
def rootfs(suite: str = "bookworm") -> Path:
    """Path of the cached tree of `suite` (building it first if needed)."""
    out = subprocess.run(
        [str(BUILD_SCRIPT), suite], check=True, stdout=subprocess.PIPE, text=True, timeout=1800
    ).stdout
    tree = Path(out.strip().splitlines()[-1])
    if not (tree / "lib/systemd/systemd").exists():
        raise RuntimeError(f"{tree} is not a complete tree (no /lib/systemd/systemd)")
    return tree
