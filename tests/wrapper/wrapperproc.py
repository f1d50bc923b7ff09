"""Start the real xnbd-wrapper (and run the real xnbd-wrapper-ctl) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serverproc import free_port, server_env, stop_process

WRAPPER = [sys.executable, "-c", "import sys; from xnbdd.cli.wrapper import main; sys.exit(main())"]
CTL = [sys.executable, "-c", "import sys; from xnbdd.cli.wrapper_ctl import main; sys.exit(main())"]
SERVER = f"{sys.executable} -m xnbdd"


@dataclass
class WrapperProcess:
    proc: subprocess.Popen[bytes]
    port: int
    control: Path
    db: Path
    log_path: Path

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str) -> tuple[int, str]:
        done = subprocess.run(
            [*CTL, "--socket", str(self.control), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=server_env(),
        )
        return done.returncode, done.stdout + done.stderr

    def export_servers(self) -> list[tuple[int, str]]:
        """(pid, command line) of the wrapper's running xnbd-server children."""
        pids = []  # children started from any thread (trio spawns from worker threads)
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += (task / "children").read_text().split()
        found = []
        for pid in pids:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append((int(pid), cmdline.decode(errors="replace")))
        return found

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.proc, timeout)


def wait_until_serving(w: WrapperProcess, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.proc.poll() is not None:
            raise RuntimeError(f"wrapper exited early ({w.proc.returncode}):\n{w.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", w.port), 0.2):
            if w.control.exists():
                return
        time.sleep(0.02)
    raise TimeoutError(f"wrapper did not start:\n{w.log()}")


def wrapper_args(tmp_path: Path, port: int, *extra: str, control: Path | None = None) -> list[str]:
    return [
        "--lport",
        str(port),
        "--laddr",
        "127.0.0.1",
        "--socket",
        str(control or tmp_path / "ctl"),
        "--dbpath",
        str(tmp_path / "state" / "xnbd.state"),
        "--run-dir",
        str(tmp_path / "r"),
        "--xnbd-server",
        SERVER,
        *extra,
    ]


@contextlib.contextmanager
def running_wrapper(
    tmp_path: Path,
    *extra: str,
    check_exit: bool = True,
    port: int | None = None,
    control: Path | None = None,
) -> Iterator[WrapperProcess]:
    port = port or free_port()
    log_path = tmp_path / f"wrapper-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*WRAPPER, *wrapper_args(tmp_path, port, *extra, control=control)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
        )
    w = WrapperProcess(
        proc, port, control or tmp_path / "ctl", tmp_path / "state" / "xnbd.state", log_path
    )
    try:
        wait_until_serving(w)
        yield w
    finally:
        status = w.stop()
    if check_exit:
        assert status == 0, f"wrapper exit status {status}; log:\n{w.log()}"


def start_wrapper(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a wrapper that is expected to refuse to start."""
    return subprocess.run(
        [*WRAPPER, *wrapper_args(tmp_path, free_port(), *extra)],
        capture_output=True,
        text=True,
        timeout=30,
        env=server_env(),
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive either
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
