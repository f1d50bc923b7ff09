"""Certificates for TLS tests, made with the openssl command: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a second CA that signed none of them.

Directories use the layout qemu, nbdkit and libnbd read: ``server/`` holds ca-cert.pem,
server-cert.pem, server-key.pem (also usable by nbdkit and xnbd-server); ``client/`` holds
ca-cert.pem, client-cert.pem, client-key.pem (libnbd's tls-certificates=, qemu's
tls-creds-x509 endpoint=client); ``anonymous/`` only ca-cert.pem (a client without a
certificate); ``wrong-ca/`` a client trusting the other CA.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Certificates:
    root: Path

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def client(self) -> Path:
        return self.root / "client"

    @property
    def anonymous(self) -> Path:
        return self.root / "anonymous"

    @property
    def wrong_ca(self) -> Path:
        return self.root / "wrong-ca"

    @property
    def ca_file(self) -> Path:
        return self.server / "ca-cert.pem"


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _ca(work: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", DAYS,
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=work,
    )  # fmt: skip


def _leaf(work: Path, ca: str, name: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=work,
    )  # fmt: skip
    (work / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", DAYS,
        "-extfile", f"{name}.ext",
        cwd=work,
    )  # fmt: skip


def make_certificates(root: Path) -> Certificates:
    work = root / "work"
    work.mkdir(parents=True)
    _ca(work, "ca")
    _ca(work, "other-ca")
    _leaf(
        work,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\n",
    )
    _leaf(
        work,
        "ca",
        "client",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )
    certs = Certificates(root)
    layout = {
        certs.server: {
            "ca-cert.pem": "ca-cert.pem",
            "server-cert.pem": "server-cert.pem",
            "server-key.pem": "server-key.pem",
        },
        certs.client: {
            "ca-cert.pem": "ca-cert.pem",
            "client-cert.pem": "client-cert.pem",
            "client-key.pem": "client-key.pem",
        },
        certs.anonymous: {"ca-cert.pem": "ca-cert.pem"},
        certs.wrong_ca: {
            "ca-cert.pem": "other-ca-cert.pem",
        },
    }
    for directory, files in layout.items():
        directory.mkdir()
        for target, source in files.items():
            shutil.copy(work / source, directory / target)
    # a client certificate signed by the wrong CA, for --tls-verify-peer
    _leaf(work, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")
    stranger = root / "stranger"
    stranger.mkdir()
    shutil.copy(work / "ca-cert.pem", stranger / "ca-cert.pem")
    shutil.copy(work / "stranger-cert.pem", stranger / "client-cert.pem")
    shutil.copy(work / "stranger-key.pem", stranger / "client-key.pem")
    return certs
