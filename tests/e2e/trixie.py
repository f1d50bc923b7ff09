"""Debian 13's clients and peers, run against the server on the host.

The cached trixie tree (rootfs("trixie")) has libnbd 1.22 (nbdinfo, nbdcopy, nbdsh), qemu 10
(qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) and nbdkit 1.42. Each command runs in a
throwaway systemd-nspawn container on that tree: the host's network (so 127.0.0.1 is the host's
loopback, where the server under test listens), a volatile overlay (the cached tree is never
changed) and the host directories the caller binds in at the same path.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path


def nspawn_command(
    tree: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[Path] = (),
    writable: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The systemd-nspawn command line that runs `argv` in `tree` (see the module docstring).

    `binds` are bound read-only and `writable` read-write, each at its host path.
    """
    args = [
        "systemd-nspawn",
        "--quiet",
        "-D",
        str(tree),
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        "--as-pid2",
        f"--machine=xnbdd-t-{uuid.uuid4().hex[:8]}",
    ]
    args += [f"--bind-ro={p}" for p in binds]
    args += [f"--bind={p}" for p in writable]
    args += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
    return [*args, "--", *argv]


def run_in_tree(
    tree: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[Path] = (),
    writable: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion in a container on `tree`; stdout and stderr are captured."""
    command = nspawn_command(tree, argv, binds=binds, writable=writable, env=env)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} in {tree} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result
