"""SIGHUP re-reads the configuration file: live settings change while clients stay, the rest
is reported as waiting for a restart, and a broken file changes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import ServerProcess, running_server

pytestmark = pytest.mark.e2e


def description(srv: ServerProcess) -> str:
    out = subprocess.run(["nbdinfo", "--json", srv.uri], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["exports"][0].get("description", ""))


def hup_and_wait(srv: ServerProcess, count: int) -> None:
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while srv.log().count("reloaded") < count:
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.02)


def test_sighup_applies_live_settings_and_reports_the_rest(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = tmp_path / "disk.conf"
    config.write_text(f"mode = target\nimage = {image}\ndescription = first\n")
    with running_server("--config", str(config), tmp_path=tmp_path) as srv:
        assert description(srv) == "first"
        other = tmp_path / "other.img"
        other.write_bytes(bytes(1 << 20))
        config.write_text(
            f"mode = target\nimage = {other}\ndescription = second\nmax-queue-size = 4\n"
        )
        hup_and_wait(srv, 1)
        assert description(srv) == "second"
        assert "image changed in" in srv.log() and "next restart" in srv.log()
        config.write_text("mode = target\nimage = relative.img\n")
        hup_and_wait(srv, 2)
        assert "reload failed, settings unchanged" in srv.log()
        assert description(srv) == "second"
        h = import_nbd().NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"still the first image", 0)
        h.shutdown()
    assert image.read_bytes().startswith(b"still the first image")
    assert other.read_bytes() == bytes(1 << 20)
