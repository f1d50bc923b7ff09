"""Real systemd pieces for tests: a notify socket receiver, a private journald, free ports.

Plain classes (no pytest) so that unit tests and end-to-end tests can share them; the pytest
fixtures wrapping them live in tests/e2e/conftest.py.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read it back, release it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until a TCP connect to host:port succeeds (the connection is closed again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


@dataclass
class Notification:
    pid: int | None
    fields: dict[str, str]
    at: float  # time.monotonic() on arrival


@dataclass
class NotifyReceiver:
    """Stands in for systemd's notify socket (an abstract AF_UNIX datagram socket).

    Like systemd, it reads all the time (a background thread), so a sender never finds the
    socket's small queue (net.unix.max_dgram_qlen, 10) full just because the test was busy.
    Every datagram is kept in `received` in arrival order, with the sender's PID as the kernel
    reports it (SO_PASSCRED), so tests can assert on order, content, timing and origin.
    """

    address: str = field(default_factory=lambda: f"@xnbdd-test-{uuid.uuid4().hex}")
    received: list[Notification] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        abstract = self.address.startswith("@")
        self.sock.bind("\0" + self.address[1:] if abstract else self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self._queue: queue.Queue[Notification] = queue.Queue()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_all, daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._closing.set()
        self._reader.join()
        self.sock.close()

    def _read_all(self) -> None:
        while not self._closing.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 253)
                )
            except TimeoutError:
                continue
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)  # releases systemd-notify's barrier
            text = data.decode(errors="replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            self._queue.put(Notification(pid=pid, fields=fields, at=time.monotonic()))

    def recv(self, timeout: float = 5.0) -> Notification:
        """The next datagram not yet returned; raises TimeoutError when none arrives in time."""
        try:
            note = self._queue.get(timeout=max(timeout, 0))
        except queue.Empty:
            raise TimeoutError(f"no notification within {timeout} s") from None
        self.received.append(note)
        return note

    def wait_for(
        self, key: str, value: str | Callable[[str], bool] | None = None, timeout: float = 10.0
    ) -> Notification:
        """Receive until a datagram carries key (equal to value, or accepted by it when it is a
        function); earlier datagrams stay in `received`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [n.fields for n in self.received]
                raise TimeoutError(f"no {key}={value or '*'} within {timeout} s; got {seen}")
            try:
                note = self.recv(remaining)
            except TimeoutError:
                continue
            if key not in note.fields:
                continue
            got = note.fields[key]
            if value is None or (value(got) if callable(value) else got == value):
                return note

    def collect(self, seconds: float) -> list[Notification]:
        """Everything that arrives during the next `seconds`."""
        deadline = time.monotonic() + seconds
        got = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got.append(self.recv(remaining))
            except TimeoutError:
                break
        return got

    def drain(self, quiet: float = 0.2) -> list[Notification]:
        """Everything that arrives until nothing has come for `quiet` seconds."""
        got = []
        while True:
            try:
                got.append(self.recv(quiet))
            except TimeoutError:
                return got


class Journald:
    """A real systemd-journald in a private mount namespace: own /run/systemd, volatile storage.

    Processes log into it by running under `enter` (nsenter into its mount namespace). The host's
    /run/systemd is never touched.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        conf = workdir / "journald.conf"
        conf.write_text(
            "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nRateLimitBurst=0\n"
        )
        script = (
            "mount --make-rprivate / && mount -t tmpfs tmpfs /run/systemd"
            " && mkdir -p /run/systemd/journal && mount -t tmpfs tmpfs /run/log"
            f" && mount --bind {conf} /etc/systemd/journald.conf"
            " && exec /lib/systemd/systemd-journald"
        )
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script])
        self.root = Path("/proc", str(self.proc.pid), "root")
        deadline = time.monotonic() + 5
        while not (self.root / "run/systemd/journal/socket").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("private systemd-journald did not start")
            time.sleep(0.01)
        self.enter = ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--"]

    def entries(self, *matches: str) -> list[dict[str, object]]:
        """All entries (journalctl -o json), optionally filtered by FIELD=value matches."""
        subprocess.run([*self.enter, "journalctl", "--sync"], check=False, capture_output=True)
        out = subprocess.run(
            [
                "journalctl",
                "-D",
                str(self.root / "run/log/journal"),
                "-o",
                "json",
                "--no-pager",
                *matches,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def missing_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


# The programs as the package installs them, run from this checkout (bound at /opt/xnbdd).
PROGRAMS = {
    "xnbd-server": "xnbdd.cli.server",
    "xnbd-bgctl": "xnbdd.cli.bgctl",
    "xnbd-wrapper": "xnbdd.cli.wrapper",
    "xnbd-wrapper-ctl": "xnbdd.cli.wrapper_ctl",
}
PROGRAM_SCRIPT = (
    "#!/bin/sh\nPYTHONPATH=/opt/xnbdd exec /usr/bin/python3 -c "
    "'import sys; from {module} import main; sys.exit(main())' \"$@\"\n"
)


def checkout_binds(work: Path, data: Path, etc: Path | None = None) -> dict[str, str]:
    """Binds (host path -> container path) that install this checkout in a container as the
    package would: the programs in /usr/local/bin, the units in /etc/systemd/system, `data` as
    /var/lib/xnbd and `etc` (if given) as /etc/xnbd. The scripts are written into `work`."""
    binds = {str(REPO): "/opt/xnbdd", str(data): "/var/lib/xnbd"}
    if etc is not None:
        binds[str(etc)] = "/etc/xnbd"
    for program, module in PROGRAMS.items():
        script = work / program
        script.write_text(PROGRAM_SCRIPT.format(module=module))
        script.chmod(0o755)
        binds[str(script)] = f"/usr/local/bin/{program}"
    for unit in sorted((REPO / "units").iterdir()):
        binds[str(unit)] = f"/etc/systemd/system/{unit.name}"
    return binds


def private_cgroups(name: str) -> list[Path]:
    """Fresh cgroups for one container, below ours in each hierarchy systemd uses.

    With --keep-unit, nspawn puts the container in its caller's cgroup and its systemd creates
    its units there: two containers booted at once by processes that share a cgroup (two test
    runs on one machine) would then manage the same unit cgroups and signal each other's
    processes. A cgroup of its own per container keeps them apart."""
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            root = Path("/sys/fs/cgroup/systemd")
        elif controllers == "" and Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
            root = Path("/sys/fs/cgroup/unified")  # the hybrid layout's v2 tree
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            root = Path("/sys/fs/cgroup")  # the unified layout
        else:
            continue
        cgroup = root / path.lstrip("/") / name
        cgroup.mkdir()
        made.append(cgroup)
    return made


def release_cgroups(cgroups: list[Path]) -> None:
    """Remove what private_cgroups made (and what the container left below it), once empty."""
    for cgroup in cgroups:
        for below, _dirs, _files in sorted(os.walk(cgroup), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(below)


class Container:
    """systemd 252 as PID 1 in systemd-nspawn on the cached tree, with a private network.

    `binds` maps host paths to container paths (read-only unless listed in `writable`). The tree
    is never modified (--volatile=overlay). `run` executes inside all of the container's
    namespaces; `in_net` runs a *host* program inside the container's network namespace only
    (how host-side NBD clients reach a server listening on the container's loopback).
    """

    def __init__(
        self, tree: Path, workdir: Path, binds: dict[str, str], writable: tuple[str, ...] = ()
    ) -> None:
        self.workdir = workdir
        self.console = workdir / "console.log"
        args = [
            "systemd-nspawn",
            "-D",
            str(tree),
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "-b",
            "--console=pipe",
            f"--machine=xnbdd-{uuid.uuid4().hex[:8]}",
        ]
        for host, guest in binds.items():
            flag = "--bind" if host in writable else "--bind-ro"
            args.append(f"{flag}={host}:{guest}")
        self.cgroups = private_cgroups(f"xnbdd-test-{uuid.uuid4().hex[:8]}")

        def join_cgroups() -> None:  # in the child, before nspawn runs
            for cgroup in self.cgroups:
                (cgroup / "cgroup.procs").write_text("0")

        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=join_cgroups,
            )
        try:
            self.leader = self._find_leader()
            self._wait_running()
        except BaseException:
            self.kill()
            raise

    def _find_leader(self) -> int:
        """The container's PID 1 (NSpid "<host pid> 1"); nspawn's short-lived helper children
        do not qualify, so nsenter never targets a process that is about to vanish."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited early:\n{self.console_text()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                nspids = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if nspids and nspids.group(1).split()[1:] == ["1"]:
                    return int(pid)
            time.sleep(0.05)
        raise TimeoutError("systemd-nspawn started no container")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            state = (proc.stdout + proc.stderr).strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"container never finished booting ({state!r}):\n{self.console_text()}")

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd inside the container; raises with its output when check fails."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def in_net(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-n", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def popen_in_net(self, *cmd: str) -> subprocess.Popen[str]:
        """Start a host program in the container's network namespace, stdin/stdout piped."""
        return subprocess.Popen(
            ["nsenter", "-t", str(self.leader), "-n", *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, object]]:
        self.run("journalctl", "--sync", check=False)
        out = self.run("journalctl", "-o", "json", "--no-pager", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def poweroff(self) -> None:
        if self.proc.poll() is None:
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=20)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        release_cgroups(self.cgroups)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        release_cgroups(self.cgroups)
