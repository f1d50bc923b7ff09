"""A control socket passed by systemd (FileDescriptorName=control) is served as the control
socket, beside the NBD listener, instead of being taken for a client port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serverproc import REPO, free_port, server_command

pytestmark = pytest.mark.e2e


def test_named_control_socket_from_systemd_socket_activate(tmp_path: Path) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port, ctl = free_port(), tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "-l",
            str(ctl),
            "--fdname=nbd:control",
            "-E",
            f"PYTHONPATH={REPO}",
            *server_command("--target", str(image)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not ctl.exists():
            assert time.monotonic() < deadline, "socket-activate did not listen"
            time.sleep(0.02)
        # The first connection starts the daemon (listen mode execs it in place).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as nbd:
            assert nbd.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        query = subprocess.run(
            [sys.executable, "-m", "xnbdd.cli.bgctl", "--json", "--query", str(ctl)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=REPO,
        )
        assert query.returncode == 0, query.stderr
        answer = json.loads(query.stdout)
        assert answer["mode"] == "target" and answer["size"] == 1 << 20
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
