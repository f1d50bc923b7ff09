"""``xnbd-bgctl --query`` lists the clients connected to a real daemon (python3-libnbd holds the
connections), in text and JSON, and forgets them when they leave."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import running_server, server_env

pytestmark = pytest.mark.e2e


def bgctl(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "xnbdd.cli.bgctl", *args],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_query_lists_connected_clients_with_export_and_since(tmp_path: Path) -> None:
    nbd = import_nbd()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    control = tmp_path / "ctl.sock"
    with running_server(
        "--target", str(image), "--control-socket", str(control), tmp_path=tmp_path
    ) as srv:
        before = time.time()
        handles = []
        try:
            for name in ("disk", "other"):
                h = nbd.NBD()
                h.set_export_name(name)
                h.connect_uri(srv.uri + name)
                handles.append(h)
            after = time.time()
            status = json.loads(bgctl("--json", "--query", str(control)))
            text = bgctl("--query", str(control))
        finally:
            for h in handles:
                h.shutdown()
        clients = sorted(status["connections"], key=lambda c: c["export"])
        assert [c["export"] for c in clients] == ["disk", "other"]
        for c in clients:
            assert c["client"].startswith("127.0.0.1:")
            assert before - 1 <= c["since"] <= after + 1  # the server's clock, same machine
            assert c["tls"] is False
        assert status["clients"] == 2
        lines = text.splitlines()
        assert "connected clients: 2" in lines
        for c in clients:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(c["since"]))
            # two clients at once may have moved to worker processes (xnbdd/workers.py) by now
            line = re.escape(f'  {c["client"]}: export "{c["export"]}", since {since}')
            assert any(re.fullmatch(line + r"(, worker process \d+)?", x) for x in lines), lines
        # Gone once they disconnect (the server notices the close on its own schedule).
        deadline = time.monotonic() + 30
        while json.loads(bgctl("--json", "--query", str(control)))["connections"]:
            assert time.monotonic() < deadline, "the clients are still listed"
            time.sleep(0.05)
        assert "connected clients: 0" in bgctl("--query", str(control)).splitlines()
