"""TLS under real systemd (nspawn on the cached Debian tree): xnbd@tls.service with the shipped
LoadCredential= drop-in (etc/xnbd/tls-credentials.conf.example) serves nbds:// to a real client,
the private key staying readable by root alone, the hardened unit unchanged."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import REPO, Container, checkout_binds, missing_tools
from tests.tlscerts import Certificates, make_certificates

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nspawn,
    pytest.mark.skipif(
        bool(missing_tools("nbdcopy", "openssl")), reason="nbdcopy (libnbd-bin), openssl missing"
    ),
]

PORT = 10812
IMAGE_SIZE = 8 << 20
CONFIG = f"mode = target\nimage = /var/lib/xnbd/tls.img\nlport = {PORT}\ntls = require\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def box(
    systemd_tree: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Container, Path]]:
    work = tmp_path_factory.mktemp("nspawn-tls")
    data = work / "data"
    data.mkdir()
    (data / "tls.img").write_bytes(bytes(IMAGE_SIZE))
    etc = work / "etc-xnbd"
    (etc / "tls").mkdir(parents=True)
    (etc / "tls.conf").write_text(CONFIG)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(certs.server / name, etc / "tls" / name)
    os.chmod(etc / "tls" / "server-key.pem", 0o600)
    binds = checkout_binds(work, data, etc)
    dropin = "/etc/systemd/system/xnbd@tls.service.d/tls.conf"
    binds[str(REPO / "etc/xnbd/tls-credentials.conf.example")] = dropin
    container = Container(systemd_tree, work, binds, writable=(str(data),))
    yield container, data
    container.poweroff()


def test_load_credential_gives_the_hardened_service_its_certificates(
    box: tuple[Container, Path], certs: Certificates, tmp_path: Path
) -> None:
    container, data = box
    verify = container.run("systemd-analyze", "verify", "--man=no", "xnbd@tls.service", check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    container.run("systemctl", "start", "xnbd@tls.service")
    payload = os.urandom(IMAGE_SIZE)
    src = tmp_path / "src.img"
    src.write_bytes(payload)
    uri = f"nbds://127.0.0.1:{PORT}/tls?tls-certificates={certs.client}"
    container.in_net("nbdcopy", str(src), uri)
    assert (data / "tls.img").read_bytes() == payload
    back = tmp_path / "back.img"
    container.in_net("nbdcopy", uri, str(back))
    assert back.read_bytes() == payload
    refused = container.in_net("nbdinfo", f"nbd://127.0.0.1:{PORT}/tls", check=False)
    assert refused.returncode != 0
    messages = [
        str(e["MESSAGE"])
        for e in container.journal("-u", "xnbd@tls.service")
        if e.get("SYSLOG_IDENTIFIER") == "xnbd-server"
    ]
    assert any(m.startswith("TLS started") for m in messages), messages
    container.run("systemctl", "stop", "xnbd@tls.service")
