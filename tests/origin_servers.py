"""Real NBD servers for the proxy's tests: nbdkit, qemu-nbd and nbd-server on 127.0.0.1 or a
unix socket, started per test and killed afterwards."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

_READ = re.compile(r"connection=\d+ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) \.\.\.$")
_WRITE = re.compile(r"connection=\d+ Write id=\d+ ")
_EXTENTS = re.compile(r"connection=\d+ Extents id=\d+ ")


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int | None, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if port is None:
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(host)
                return
            except OSError:
                pass
        elif _tcp_listening(port):  # no probe connection: nbd-server -d serves only one
            return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args!r} did not start listening")


def _tcp_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@dataclass
class Origin:
    host: str  # 127.0.0.1, or a unix socket path
    port: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None

    def reads(self) -> list[tuple[int, int]]:
        """(offset, length) of every READ the server received (nbdkit with the log filter)."""
        assert self.log is not None, "start the origin with log=True"
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(int(m[1], 16), int(m[2], 16)) for m in map(_READ.search, lines) if m]

    def extents_requests(self) -> int:
        """BLOCK_STATUS requests the server received (nbdkit with the log filter)."""
        assert self.log is not None
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(1 for line in lines if _EXTENTS.search(line))

    def writes(self) -> int:
        assert self.log is not None
        return sum(1 for line in self.log.read_text().splitlines() if _WRITE.search(line))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGSTOP, and wait until every thread is really stopped (delivery is asynchronous)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            task_dir = Path(f"/proc/{self.proc.pid}/task")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                states = [
                    (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    for task in task_dir.iterdir()
                ]
                if all(state in "tT" for state in states):
                    return
                time.sleep(0.005)

    def cont(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


@contextmanager
def _run(argv: list[str], host: str, port: int | None, log: Path | None) -> Iterator[Origin]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(host, port, proc)
        yield Origin(host, str(port or ""), proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def nbdkit(
    tmp: Path,
    plugin_args: list[str],
    *,
    unix: bool = False,
    oldstyle: bool = False,
    log: bool = False,
    filters: tuple[str, ...] = (),
    port: int | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[Origin]:
    """``nbdkit -f`` with PLUGIN ARGS (e.g. ["memory", "64M"] or ["file", path]); ``options``
    go before them (e.g. ``--tls=require``)."""
    argv = [need("nbdkit"), "-f", "--exit-with-parent", *options]
    if oldstyle:
        argv.append("-o")
    logfile = None
    for name in filters:
        argv.append(f"--filter={name}")
    if log:
        argv.append("--filter=log")
    if unix:
        host, tcp_port = str(tmp / f"nbdkit-{os.getpid()}-{time.monotonic_ns()}.sock"), None
        argv += ["-U", host]
    else:
        host, tcp_port = "127.0.0.1", port or free_port()
        argv += ["-i", host, "-p", str(tcp_port)]
    argv += plugin_args
    if log:
        logfile = tmp / f"nbdkit-{time.monotonic_ns()}.log"
        argv.append(f"logfile={logfile}")
    with _run(argv, host, tcp_port, logfile) as origin:
        yield origin


@contextmanager
def qemu_nbd(tmp: Path, image: Path, *, port: int | None = None) -> Iterator[Origin]:
    tcp_port = port or free_port()
    argv = [need("qemu-nbd"), "-f", "raw", "-b", "127.0.0.1", "-p", str(tcp_port), "-t", "-e", "8"]
    with _run([*argv, str(image)], "127.0.0.1", tcp_port, None) as origin:
        yield origin


@contextmanager
def nbd_server(tmp: Path, image: Path, name: str = "disk") -> Iterator[Origin]:
    tcp_port = free_port()
    config = tmp / f"nbd-server-{tcp_port}.conf"
    config.write_text(
        f"[generic]\nport = {tcp_port}\nlisten = 127.0.0.1\nallowlist = true\n"
        f"[{name}]\nexportname = {image}\n"
    )
    argv = [need("nbd-server"), "-d", "-C", str(config)]
    with _run(argv, "127.0.0.1", tcp_port, None) as origin:
        yield origin


def random_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Write ``size`` reproducible random bytes to ``path`` and return them."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def sparse_image(
    path: Path, size: int, *, fraction: float = 0.2, extent: int = 1 << 20, seed: int = 1
) -> tuple[bytes, list[int]]:
    """A sparse file of ``size`` bytes with random data in ``fraction`` of its ``extent``-sized
    slots, scattered, holes elsewhere. Returns its bytes and the offsets of the data extents."""
    rng = random.Random(seed)
    slots = size // extent
    chosen = sorted(rng.sample(range(slots), max(1, round(slots * fraction))))
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in chosen:
            chunk = rng.randbytes(extent)
            content[slot * extent : (slot + 1) * extent] = chunk
            f.seek(slot * extent)
            f.write(chunk)
    return bytes(content), [slot * extent for slot in chosen]
