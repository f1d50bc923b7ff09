"""--max-clients N (issue 15): past N connections a new client is refused during the handshake
with NBD_REP_ERR_POLICY and a message (nbdinfo shows it and fails), the journal says why, and the
slot is free again once a client leaves. The configuration file key works the same way."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import rawnbd
from tests.origin_servers import need
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e


def nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("nbdinfo"), "--size", uri], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("how", ["option", "config"])
def test_a_client_past_the_limit_is_refused_until_a_slot_frees(
    tmp_path: Path, image: Path, how: str
) -> None:
    if how == "option":
        args = ["--max-clients", "2"]
    else:
        config = tmp_path / "server.conf"
        config.write_text("max-clients = 2\n")
        args = ["--config", str(config)]
    with running_server("--target", *args, str(image), tmp_path=tmp_path) as server:
        first = rawnbd.RawClient(server.port)
        first.go()
        second = rawnbd.RawClient(server.port)  # counted while it negotiates, too
        refused = nbdinfo(server.uri)
        assert refused.returncode != 0
        assert "policy" in refused.stderr, refused.stderr  # libnbd names NBD_REP_ERR_POLICY
        # a raw look at the refusal: ERR_POLICY for the option, the connection stays usable
        raw = rawnbd.RawClient(server.port)
        raw.client_flags(3)
        raw.option(rawnbd.OPT_GO, raw.info_data(""))
        _opt, rep, message = raw.reply()
        assert rep == rawnbd.ERR_POLICY and b"limit" in message
        raw.option(rawnbd.OPT_ABORT)
        raw.close()
        assert "refused: already 2 clients" in server.log()
        second.close()
        # the slot is free again once the server noticed the close
        deadline = time.monotonic() + 20
        while "client disconnected" not in server.log():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ok = nbdinfo(server.uri)
        assert ok.returncode == 0, ok.stderr
        assert int(ok.stdout) == image.stat().st_size
        first.close()


def test_an_oldstyle_client_past_the_limit_is_closed_with_a_journal_line(
    tmp_path: Path, image: Path
) -> None:
    args = ("--target", "--oldstyle", "--max-clients", "1", str(image))
    with (
        running_server(*args, tmp_path=tmp_path) as server,
        socket.create_connection(("127.0.0.1", server.port), 10) as first,
    ):
        assert first.recv(8) == b"NBDMAGIC"  # served
        with socket.create_connection(("127.0.0.1", server.port), 10) as second:
            second.settimeout(10)
            assert second.recv(8) == b""  # closed without a greeting: nothing to tell it
        assert "client refused: already 1 client" in server.log()
