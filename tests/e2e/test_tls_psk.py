"""Pre-shared keys (``--tls-psk``) with the Python that has them: Debian 13's python3 (3.13)
and libnbd 1.22's nbdinfo/nbdcopy, run inside the cached trixie tree (tests/e2e/rootfs.py) with
systemd-nspawn, the daemon from this work tree. On the host's Python 3.11 the same option fails
at start-up with its reason (tests/e2e/test_tls.py)."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.nspawn]

SIZE = 8 << 20
SCRIPT = """\
set -u
cd /opt/xnbdd
python3 -m xnbdd --target --tls=require --tls-psk /psk/server.psk \\
    --lport 10900 --laddr 127.0.0.1 /psk/disk.img >/psk/server.log 2>&1 &
server=$!
for _ in $(seq 100); do grep -q "ready: " /psk/server.log && break; sleep 0.1; done
uri="nbds://alice@127.0.0.1:10900/?tls-psk-file=/psk/alice.psk"
nbdcopy /psk/source.img "$uri" && nbdcopy "$uri" /psk/back.img && echo ALICE-OK
nbdinfo "nbds://bob@127.0.0.1:10900/?tls-psk-file=/psk/bob.psk" >/dev/null 2>&1 || echo BOB-REFUSED
nbdinfo "nbds://alice@127.0.0.1:10900/?tls-psk-file=/psk/wrong.psk" >/dev/null 2>&1 \\
    || echo WRONG-KEY-REFUSED
kill -TERM $server; wait $server; echo "SERVER-EXIT=$?"
"""


def test_psk_clients_with_the_key_get_in_and_others_do_not(
    trixie_tree: Path, tmp_path: Path
) -> None:
    key = secrets.token_hex(32)
    (tmp_path / "server.psk").write_text(f"alice:{key}\ncarol:{secrets.token_hex(32)}\n")
    (tmp_path / "alice.psk").write_text(f"alice:{key}\n")
    (tmp_path / "bob.psk").write_text(f"bob:{key}\n")
    (tmp_path / "wrong.psk").write_text(f"alice:{secrets.token_hex(32)}\n")
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(SIZE)
    data = os.urandom(SIZE)
    (tmp_path / "source.img").write_bytes(data)
    (tmp_path / "run.sh").write_text(SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [
            "systemd-nspawn", "-q", "-D", str(trixie_tree), "--register=no", "--keep-unit",
            "--volatile=overlay", "--private-network", f"--bind-ro={repo}:/opt/xnbdd",
            f"--bind={tmp_path}:/psk", "sh", "/psk/run.sh",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = result.stdout
    log = (tmp_path / "server.log").read_text()
    assert "ALICE-OK" in out, out + result.stderr + log
    assert (tmp_path / "disk.img").read_bytes() == data
    assert (tmp_path / "back.img").read_bytes() == data
    assert "BOB-REFUSED" in out and "WRONG-KEY-REFUSED" in out, out + log
    assert "SERVER-EXIT=0" in out, out + log
    assert "TLS started: TLSv1.2" in log
