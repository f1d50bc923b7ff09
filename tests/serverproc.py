"""Start the real xnbd-server as a child process for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xnbdd", *args]


def wait_until_ready(log_path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """The sockets are bound before the backend opens, so an accepting port does not yet mean
    serving: wait for the daemon's "ready:" line (what it sends as READY=1 under systemd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        if "ready: " in log_path.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise TimeoutError("server did not become ready")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_server(
    *args: str, tmp_path: Path, env: dict[str, str] | None = None, check_exit: bool = True
) -> Iterator[ServerProcess]:
    """``xnbd-server ARGS --lport <free> --laddr 127.0.0.1``; stopped with SIGTERM afterwards,
    and (``check_exit``) the clean stop is asserted: exit status 0."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_command(*args, "--lport", str(port), "--laddr", "127.0.0.1"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(env),
        )
    server = ServerProcess(proc, port, log_path)
    try:
        wait_until_ready(log_path, proc)
        yield server
    finally:
        status = server.stop()
    if check_exit:
        assert status == 0, f"server exit status {status}; log:\n{server.log()}"
