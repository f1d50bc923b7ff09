"""The daemon raises its soft limit on open files to the hard one (xnbdd/fdlimit.py)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import daemon_command, daemon_env
from tests.e2e.systemd_fixtures import free_port, wait_for_port

LOW, HIGH = 256, 4096  # systemd's defaults are 1024 and 524288; any soft < hard will do


def start_with_limits() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, HIGH))


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_raise_open_files_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource; from xnbdd.fdlimit import raise_open_files_limit as r; "
        "print(r(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=start_with_limits,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(HIGH)] * 3


def test_the_daemon_serves_with_the_raised_limit(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    cmd = daemon_command("--target", str(image), "--lport", str(port), "--laddr", "127.0.0.1")
    proc = subprocess.Popen(cmd, env=daemon_env(), preexec_fn=start_with_limits)
    try:
        wait_for_port("127.0.0.1", port)  # it raises the limit before it listens
        assert open_files_limits(proc.pid) == (HIGH, HIGH)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
