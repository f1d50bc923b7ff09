"""SIGTERM again and again while a server stops ends it cleanly (exit 0), never by the default
action when the daemon's signal receiver has closed (issue 15: test_rule20 failed one run in 14)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.serverproc import free_port, server_command, server_env, wait_until_ready

pytestmark = pytest.mark.e2e


def start(image: Path, log_path: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            server_command("--target", str(image), "--lport", str(port), "--laddr", "127.0.0.1"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
        )


def test_a_burst_of_sigterms_during_the_stop_exits_cleanly(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    for round_ in range(5):
        log_path = tmp_path / f"server-{round_}.log"
        proc = start(image, log_path)
        wait_until_ready(log_path, proc)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)  # the first stops it, the rest land in teardown
            time.sleep(0.002)
        assert proc.wait(5) == 0, log_path.read_text()
