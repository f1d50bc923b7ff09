"""A real single-node Ceph cluster for the RBD tests: one ceph-mon and one ceph-osd on memstore,
from Debian 12's packages, under a temporary directory, on a free port, auth none.

Start-up takes about seven seconds and nothing of it is worth caching (a monmap and keyring are
milliseconds; the mon and osd must start anyway), so the session starts it once and shares it.
``python -m tests.e2e.ceph DIR`` starts one by hand and prints its ceph.conf path (the
benchmark uses it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.serverproc import free_port

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool")
PACKAGES = "ceph-mon ceph-osd ceph-common python3-rbd python3-rados"
POOL = "xnbdd"
MEMSTORE_BYTES = 1536 << 20  # the whole cluster's data lives in the osd's memory


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if importlib.util.find_spec("rbd") is None:
        missing.append("python3-rbd")
    return missing


class CephError(RuntimeError):
    """The cluster did not start: the message says which step and why."""


@dataclass
class CephCluster:
    root: Path
    port: int
    pool: str = POOL
    procs: list[Path] = field(default_factory=list)  # pid files of the daemons

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def run(self, *cmd: str, timeout: float = 60) -> str:
        """A ceph command line tool against this cluster; CephError with its output if it fails."""
        done = subprocess.run(
            [cmd[0], "-c", str(self.conf), *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise CephError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def create_image(self, name: str, size: int) -> str:
        """A new RBD image in the pool (bytes); its ``POOL/NAME``."""
        self.run("rbd", "create", "--size", f"{size // 1024}K", f"{self.pool}/{name}")
        return f"{self.pool}/{name}"

    def remove_image(self, name: str) -> None:
        self.run("rbd", "snap", "purge", f"{self.pool}/{name}")
        self.run("rbd", "rm", "--no-progress", f"{self.pool}/{name}")

    def stop(self) -> None:
        """SIGTERM each daemon and wait for it to go (memstore: nothing to keep)."""
        for pid_file in reversed(self.procs):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon that exited but is not reaped yet (not our child: ceph daemons fork) is a zombie.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(root: Path) -> CephCluster:
    """Start a cluster under ``root`` (an empty directory) with one pool for RBD images.
    CephError says what failed; the daemons started so far are stopped again."""
    missing = missing_tools()
    if missing:
        raise CephError(f"missing {', '.join(missing)} (apt-get install {PACKAGES})")
    for sub in ("mon/a", "osd/0", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cluster = CephCluster(root, free_port())
    fsid = str(uuid.uuid4())
    # v2 protocol only, on loopback. The mon must not stop for lack of disk space on a shared
    # machine (its default refuses below 5 % free), and a one-osd pool is not a warning here; no
    # ceph-mgr runs (I/O needs none), so its absence must not become a health warning either.
    cluster.conf.write_text(
        f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{cluster.port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail crit = 0
mon data avail warn = 0
mon mgr mkfs grace = 315360000
mon warn on insecure global id reclaim allowed = false
ms bind ipv6 = false
run dir = {root}/run
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon data = {root}/mon/$id
osd data = {root}/osd/$id
keyring = {root}/keyring
"""
    )
    try:
        cluster.run("ceph-authtool", "--create-keyring", str(root / "keyring"), "--gen-key",
                    "-n", "mon.", "--cap", "mon", "allow *")  # fmt: skip
        cluster.run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                    f"[v2:127.0.0.1:{cluster.port}]", str(root / "monmap"))  # fmt: skip
        cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(root / "monmap"))
        cluster.run("ceph-mon", "-i", "a")  # forks once listening
        cluster.procs.append(root / "run" / "mon.a.pid")
        cluster.run("ceph", "osd", "create")
        cluster.run("ceph-osd", "-i", "0", "--mkfs")
        cluster.run("ceph-osd", "-i", "0")
        cluster.procs.append(root / "run" / "osd.0.pid")
        cluster.run("ceph", "osd", "pool", "create", cluster.pool, "8")
        cluster.run("rbd", "pool", "init", cluster.pool)  # waits until the osd serves the pool
    except (CephError, subprocess.TimeoutExpired) as err:
        tail = cluster.log_tail()
        cluster.stop()
        raise CephError(f"{err}\n{tail}") from err
    return cluster


if __name__ == "__main__":
    import sys

    c = start(Path(sys.argv[1]))
    print(c.conf)
