"""The daemon's life as scripts outside systemd follow it: --pid-file (with and without -d) and
--exit-with-parent, with the real daemon and a real client (nbdinfo)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import missing_tools
from tests.serverproc import free_port, server_command, server_env, stop_process

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(missing_tools("nbdinfo")), reason="needs nbdinfo (libnbd-bin)"),
]

WAIT = 30.0  # generous: the machine may be busy; every wait ends on its event


def wait_until(what: str, done: object) -> None:
    assert callable(done)
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child its parent has not reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def size_via_nbdinfo(port: int) -> int:
    out = subprocess.run(
        ["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return int(json.loads(out)["exports"][0]["export-size"])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


@contextlib.contextmanager
def killed_at_the_end(pid_file: Path) -> Iterator[None]:
    """A daemon that is not our child is stopped by its PID even when the test failed."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_pid_file_holds_the_pid_while_serving_and_goes_at_sigterm(
    image: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "run" / "xnbd.pid"
    pid_file.parent.mkdir()
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            server_command(
                "--target",
                str(image),
                "--pid-file",
                str(pid_file),
                "--lport",
                str(port),
                "--laddr",
                "127.0.0.1",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
        )
    try:
        wait_until("the pid file", pid_file.exists)
        assert pid_file.read_text() == f"{proc.pid}\n"
        assert size_via_nbdinfo(port) == 4 << 20  # it accepts clients once the file is there
        assert stop_process(proc, WAIT) == 0
    finally:
        stop_process(proc, WAIT)
    assert not pid_file.exists()
    assert list(pid_file.parent.iterdir()) == []  # no temporary file left either


def test_daemonize_writes_and_logs_the_daemon_pid(image: Path, tmp_path: Path) -> None:
    """-d forks twice: the pid file and every log line name the process that serves, not the
    one the shell started."""
    pid_file = tmp_path / "xnbd.pid"
    log_path = tmp_path / "server.log"
    port = free_port()
    launcher = subprocess.run(
        server_command(
            "--target",
            str(image),
            "-d",
            "--pid-file",
            str(pid_file),
            "--logpath",
            str(log_path),
            "--lport",
            str(port),
            "--laddr",
            "127.0.0.1",
        ),
        env=server_env(),
        capture_output=True,
        timeout=WAIT,
        check=True,
    )
    assert launcher.stderr == b""
    with killed_at_the_end(pid_file):
        wait_until("the pid file", pid_file.exists)
        pid = int(pid_file.read_text())
        assert alive(pid)
        assert size_via_nbdinfo(port) == 4 << 20
        os.kill(pid, signal.SIGTERM)
        wait_until("the daemon to exit", lambda: not alive(pid))
        wait_until("the pid file to go", lambda: not pid_file.exists())
    text = log_path.read_text()
    pids = set(re.findall(r"xnbd-server\[(\d+)\]", text))
    assert pids == {str(pid)}, text
    assert "ready: " in text and "stopped" in text


def test_exit_with_parent_stops_the_server_cleanly(image: Path, tmp_path: Path) -> None:
    """The parent (a shell waiting on its standard input) exits; the server it started in the
    background stops as on SIGTERM: "stopped" logged, the pid file removed."""
    pid_file = tmp_path / "xnbd.pid"
    log_path = tmp_path / "server.log"
    server = server_command(
        "--target",
        str(image),
        "--exit-with-parent",
        "--pid-file",
        str(pid_file),
        "--logpath",
        str(log_path),
        "--lport",
        str(free_port()),
        "--laddr",
        "127.0.0.1",
    )
    parent = subprocess.Popen(
        ["bash", "-c", '"$@" </dev/null >/dev/null 2>&1 & read -r _ || true', "bash", *server],
        stdin=subprocess.PIPE,
        env=server_env(),
    )
    assert parent.stdin is not None
    with killed_at_the_end(pid_file):
        wait_until("the pid file", pid_file.exists)
        pid = int(pid_file.read_text())
        assert alive(pid)
        parent.stdin.close()  # `read` ends: the parent exits
        assert parent.wait(WAIT) == 0
        wait_until("the server to follow its parent", lambda: not alive(pid))
        assert not pid_file.exists()
    text = log_path.read_text()
    assert "stopping: finishing requests in flight" in text and "stopped" in text, text


def test_exit_with_parent_and_daemonize_exclude_each_other(image: Path) -> None:
    done = subprocess.run(
        server_command("--target", str(image), "-d", "--exit-with-parent"),
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 2
    assert "--exit-with-parent and --daemonize exclude each other" in done.stderr
