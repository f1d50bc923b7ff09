"""TLS end to end (issue 12): the real xnbd-server with ``--tls``, real TLS clients (nbdinfo and
nbdcopy with ``nbds://``, qemu-img/qemu-io with ``tls-creds-x509``, fio's nbd engine), a raw
client that skips STARTTLS, and the proxy's origin link over TLS to nbdkit ``--tls=require``
and to ourselves. Certificates are made by openssl in the test (tests/tlscerts.py)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.trixie import run_in_tree
from tests.origin_servers import nbdkit, need, random_image
from tests.rawnbd import IHAVEOPT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, RawClient
from tests.serverproc import (
    ServerProcess,
    free_port,
    running_server,
    server_command,
    server_env,
)
from tests.tlscerts import Certificates, make_certificates

pytestmark = pytest.mark.e2e

SIZE = 16 << 20
ERR_TLS_REQD = 0x80000005
OPTION_REPLY = struct.Struct("!QIII")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    need("openssl")
    return make_certificates(tmp_path_factory.mktemp("certs"))


def nbds(server: ServerProcess, directory: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/?tls-certificates={directory}"


def image_with_data(tmp_path: Path, name: str = "disk.img", seed: int = 1) -> tuple[Path, bytes]:
    path = tmp_path / name
    return path, random_image(path, SIZE, seed)


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certificates) -> Iterator[tuple[ServerProcess, Path]]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    ctl = tmp_path / "ctl.sock"
    with running_server(
        "--target",
        "--tls=require",
        "--tls-certificates",
        str(certs.server),
        "--control-socket",
        str(ctl),
        str(path),
        tmp_path=tmp_path,
    ) as server:
        yield server, path


def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


def query(ctl: Path) -> dict[str, Any]:
    result = run(sys.executable, "-m", "xnbdd.cli.bgctl", "--json", "--query", str(ctl))
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_nbdcopy_and_nbdinfo_over_nbds(
    tmp_path: Path, certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    server, path = tls_server
    source = tmp_path / "source.img"
    data = random_image(source, SIZE, seed=5)
    uri = nbds(server, certs.client)
    info = run(need("nbdinfo"), uri)
    assert info.returncode == 0, info.stderr
    assert "with TLS" in info.stdout and "export-size: 16777216" in info.stdout
    assert run(need("nbdcopy"), str(source), uri).returncode == 0
    assert path.read_bytes() == data
    back = tmp_path / "back.img"
    assert run(need("nbdcopy"), uri, str(back)).returncode == 0
    assert back.read_bytes() == data
    assert "TLS started: TLSv1.3" in server.log()


def test_qemu_img_and_qemu_io_with_x509_credentials(
    tmp_path: Path, certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    server, path = tls_server
    creds = f"tls-creds-x509,id=tls0,dir={certs.client},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={server.port},tls-creds=tls0"
    written = run(
        need("qemu-io"),
        "--object",
        creds,
        "--image-opts",
        opts,
        "-c",
        "write -P 0xa5 1M 3M",
        "-c",
        "read -P 0xa5 1M 3M",
    )
    assert written.returncode == 0 and "Pattern verification failed" not in written.stdout, (
        written.stdout + written.stderr
    )
    assert path.read_bytes()[1 << 20 : 4 << 20] == b"\xa5" * (3 << 20)
    copy = tmp_path / "copy.raw"
    converted = run(
        need("qemu-img"),
        "convert",
        "--object",
        creds,
        "--image-opts",
        opts,
        "-O",
        "raw",
        str(copy),
    )
    assert converted.returncode == 0, converted.stderr
    assert copy.read_bytes() == path.read_bytes()


def test_a_client_skipping_starttls_learns_nothing(
    certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    server, _path = tls_server
    client = RawClient(server.port)
    try:
        client.send(struct.pack("!I", 1))  # fixed newstyle
        go = struct.pack("!I", 0) + struct.pack("!H", 0)
        for opt, data in ((OPT_GO, go), (OPT_INFO, go), (OPT_LIST, b"")):
            client.send(struct.pack("!QII", IHAVEOPT, opt, len(data)) + data)
            _magic, reply_opt, rep, length = OPTION_REPLY.unpack(client.recv(OPTION_REPLY.size))
            message = client.recv(length)
            assert (reply_opt, rep) == (opt, ERR_TLS_REQD)
            assert struct.pack("!Q", SIZE) not in message
        client.send(struct.pack("!QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
        client.sock.settimeout(10)
        assert client.sock.recv(1024) == b""  # closed, not a size
    finally:
        client.close()
    plain = run(need("nbdinfo"), f"nbd://127.0.0.1:{server.port}/")
    assert plain.returncode != 0 and "16777216" not in plain.stdout


def test_a_client_trusting_another_ca_fails(
    certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    server, _path = tls_server
    result = run(need("nbdinfo"), nbds(server, certs.wrong_ca))
    assert result.returncode != 0
    assert "16777216" not in result.stdout
    assert "TLS started" not in server.log()


def test_verify_peer_wants_a_certificate_from_the_ca(tmp_path: Path, certs: Certificates) -> None:
    path, data = image_with_data(tmp_path)
    with running_server(
        "--target",
        "--tls=require",
        "--tls-certificates",
        str(certs.server),
        "--tls-verify-peer",
        str(path),
        tmp_path=tmp_path,
    ) as server:
        for refused in (certs.anonymous, certs.root / "stranger"):
            result = run(need("nbdinfo"), nbds(server, refused))
            assert result.returncode != 0, f"{refused.name} was let in"
        assert "TLS handshake failed" in server.log()
        copy = tmp_path / "copy.img"
        assert run(need("nbdcopy"), nbds(server, certs.client), str(copy)).returncode == 0
        assert copy.read_bytes() == data


def test_status_shows_tls(certs: Certificates, tls_server: tuple[ServerProcess, Path]) -> None:
    server, path = tls_server
    ctl = path.parent / "ctl.sock"
    status = query(ctl)
    assert (status["tls"], status["tls_clients"], status["connections"]) == ("require", 0, [])
    # nbdinfo holds its connection while a slow command runs: nbdsh would need libnbd's
    # Python binding, so a TLS client is kept open with qemu-io's interactive mode instead.
    creds = f"tls-creds-x509,id=tls0,dir={certs.client},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={server.port},tls-creds=tls0"
    proc = subprocess.Popen(
        [need("qemu-io"), "--object", creds, "--image-opts", opts],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("read 0 4k\n")
        proc.stdin.flush()
        while "read 4096/4096" not in proc.stdout.readline():
            pass
        status = query(ctl)
        assert (status["clients"], status["tls_clients"]) == (1, 1)
        [connection] = status["connections"]
        assert connection["tls"] is True and connection["client"].startswith("127.0.0.1:")
        text = run(sys.executable, "-m", "xnbdd.cli.bgctl", "--query", str(ctl)).stdout
        assert "TLS require: 1 of 1 clients over TLS" in text
    finally:
        proc.communicate("quit\n", timeout=30)


def test_fio_verify_through_tls_with_four_connections(
    tmp_path: Path, certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    server, _path = tls_server
    fio = need("fio")
    # fio's nbd engine calls nbd_connect_uri without allowing local files, so the URI cannot
    # name the directory: libnbd then reads $HOME/.pki/libnbd.
    home = tmp_path / "home"
    (home / ".pki").mkdir(parents=True)
    (home / ".pki" / "libnbd").symlink_to(certs.client)
    result = run(
        fio,
        "--name=tls",
        "--ioengine=nbd",
        f"--uri=nbds://127.0.0.1:{server.port}/",
        "--rw=randwrite",
        "--bs=64k",
        "--size=4M",
        "--numjobs=4",
        "--offset_increment=4M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--group_reporting",
        env={**os.environ, "HOME": str(home)},
        cwd=tmp_path,  # fio's verify state files
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "err= 0" in result.stdout
    assert server.log().count("TLS started") >= 4


# -- start-up decisions ------------------------------------------------------------------------


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server_command(*args),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=server_env(env),
    )


def test_start_up_refuses_what_tls_cannot_be_part_of(tmp_path: Path, certs: Certificates) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    tls = ("--tls=require", "--tls-certificates", str(certs.server))
    cases = [
        (("--oldstyle",), 2, "oldstyle handshake has no STARTTLS"),
        (("--connected-fd", "0"), 2, "negotiated already"),
        (("--handoff-socket", str(tmp_path / "h.sock")), 2, "xnbd-wrapper"),
    ]
    for extra, status, message in cases:
        result = start("--target", *tls, *extra, str(path))
        assert result.returncode == status, result.stderr
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
    missing = start("--target", "--tls=on", "--tls-certificates", str(tmp_path), str(path))
    assert missing.returncode == 1 and "cannot load server-cert.pem" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="this Python's ssl supports PSK")
def test_psk_fails_at_start_up_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "ab" * 32 + "\n")
    result = start("--target", "--tls=require", "--tls-psk", str(keys), str(path))
    assert result.returncode == 1
    assert "no pre-shared key support" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_credentials_directory_is_the_default_certificate_directory(
    tmp_path: Path, certs: Certificates
) -> None:
    path, data = image_with_data(tmp_path)
    env = {"CREDENTIALS_DIRECTORY": str(certs.server)}
    with running_server("--target", "--tls=require", str(path), tmp_path=tmp_path, env=env) as s:
        copy = tmp_path / "copy.img"
        assert run(need("nbdcopy"), nbds(s, certs.client), str(copy)).returncode == 0
        assert copy.read_bytes() == data


def test_inetd_client_gets_tls(tmp_path: Path, certs: Certificates) -> None:
    """--inetd: the one client on stdin negotiates like any other, STARTTLS included."""
    path, data = image_with_data(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    copy = tmp_path / "copy.img"
    client = subprocess.Popen(
        [
            need("nbdcopy"),
            "--connections=1",  # one client is all --inetd serves
            f"nbds://127.0.0.1:{port}/?tls-certificates={certs.client}",
            str(copy),
        ]
    )
    conn, _addr = listener.accept()
    listener.close()
    server = subprocess.Popen(
        server_command(
            "--target",
            "--inetd",
            "--tls=require",
            "--tls-certificates",
            str(certs.server),
            str(path),
        ),
        stdin=conn.fileno(),
        env=server_env(),
    )
    conn.close()
    assert client.wait(60) == 0
    assert server.wait(30) == 0
    assert copy.read_bytes() == data


# -- the proxy's origin link over TLS -------------------------------------------------------------


def bgctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "xnbdd.cli.bgctl", *args)


def remote_tls_args(certs: Certificates) -> list[str]:
    return [
        "--remote-tls",
        "--remote-tls-ca",
        str(certs.ca_file),
        "--remote-tls-cert",
        str(certs.client / "client-cert.pem"),
        "--remote-tls-key",
        str(certs.client / "client-key.pem"),
    ]


def check_proxy(tmp_path: Path, certs: Certificates, port: str, data: bytes) -> None:
    """A TLS proxy of a TLS origin: read everything through it, cache-all, switch; the data
    equals the origin's at every step."""
    cache, bitmap, ctl = tmp_path / "p.cache", tmp_path / "p.bm", tmp_path / "p.ctl"
    with running_server(
        "--proxy",
        *remote_tls_args(certs),
        "--tls=require",
        "--tls-certificates",
        str(certs.server),
        "127.0.0.1",
        port,
        str(cache),
        str(bitmap),
        str(ctl),
        tmp_path=tmp_path,
    ) as proxy:
        status = query(ctl)
        assert status["remote"].endswith("(TLS)") and status["remote_state"] == "connected"
        part = tmp_path / "part.img"
        assert run(need("nbdcopy"), nbds(proxy, certs.client), str(part)).returncode == 0
        assert part.read_bytes() == data
        cached = bgctl("--cache-all", str(ctl))
        assert cached.returncode == 0, cached.stderr
        switched = bgctl("--switch", str(ctl))
        assert switched.returncode == 0, switched.stderr
        assert cache.read_bytes() == data
        after = tmp_path / "after.img"
        assert run(need("nbdcopy"), nbds(proxy, certs.client), str(after)).returncode == 0
        assert after.read_bytes() == data


def test_proxy_of_nbdkit_requiring_tls(tmp_path: Path, certs: Certificates) -> None:
    origin_image, data = image_with_data(tmp_path, "origin.img", seed=7)
    options = (
        "--tls=require",
        f"--tls-certificates={certs.server}",
        "--tls-verify-peer",
    )
    with nbdkit(tmp_path, ["file", str(origin_image)], options=options) as origin:
        check_proxy(tmp_path, certs, origin.port, data)


def test_proxy_of_ourselves_with_tls_and_a_reconnect_that_keeps_it(
    tmp_path: Path, certs: Certificates
) -> None:
    origin_image, data = image_with_data(tmp_path, "origin.img", seed=9)
    tls = ("--tls=require", "--tls-certificates", str(certs.server), "--tls-verify-peer")
    first_dir, second_dir = tmp_path / "o1", tmp_path / "o2"
    first_dir.mkdir()
    second_dir.mkdir()
    with (
        running_server("--target", *tls, "--readonly", str(origin_image), tmp_path=first_dir) as a,
        running_server("--target", *tls, "--readonly", str(origin_image), tmp_path=second_dir) as b,
    ):
        cache, bitmap, ctl = tmp_path / "p.cache", tmp_path / "p.bm", tmp_path / "p.ctl"
        with running_server(
            "--proxy",
            *remote_tls_args(certs),
            "127.0.0.1",
            str(a.port),
            str(cache),
            str(bitmap),
            str(ctl),
            tmp_path=tmp_path,
        ) as proxy:
            first = run(need("qemu-io"), "-r", "-f", "raw", proxy.uri, "-c", "read 0 4M")
            assert first.returncode == 0, first.stderr
            status = query(ctl)
            assert status["remote"] == f"127.0.0.1:{a.port} (TLS)" and status["cached_blocks"] > 0
            moved = bgctl("--reconnect", str(ctl), "127.0.0.1", str(b.port))
            assert moved.returncode == 0, moved.stderr
            status = query(ctl)
            assert status["remote"] == f"127.0.0.1:{b.port} (TLS)"
            copy = tmp_path / "copy.img"
            assert run(need("nbdcopy"), proxy.uri, str(copy)).returncode == 0
            assert copy.read_bytes() == data
            assert "TLS started" in b.log()
            assert bgctl("--cache-all", str(ctl)).returncode == 0
            assert bgctl("--switch", str(ctl)).returncode == 0
            assert cache.read_bytes() == data


def test_proxy_refuses_an_origin_it_cannot_verify(tmp_path: Path, certs: Certificates) -> None:
    origin_image, _data = image_with_data(tmp_path, "origin.img")
    options = ("--tls=require", f"--tls-certificates={certs.server}")
    local = ("--lport", str(free_port()), "--laddr", "127.0.0.1")
    with nbdkit(tmp_path, ["file", str(origin_image)], options=options) as origin:
        result = start(
            "--proxy",
            "--remote-tls",
            "--remote-tls-ca",
            str(certs.wrong_ca / "ca-cert.pem"),
            "127.0.0.1",
            origin.port,
            str(tmp_path / "p.cache"),
            str(tmp_path / "p.bm"),
            str(tmp_path / "p.ctl"),
            *local,
        )
        assert result.returncode == 1
        assert "TLS handshake failed" in result.stderr and "certificate" in result.stderr
        plain = start(
            "--proxy",
            "127.0.0.1",
            origin.port,
            str(tmp_path / "q.cache"),
            str(tmp_path / "q.bm"),
            str(tmp_path / "q.ctl"),
            *local,
        )
        assert plain.returncode == 1 and "ERR_TLS_REQD" in plain.stderr


def test_proxy_reconnects_to_a_restarted_tls_origin_over_tls(
    tmp_path: Path, certs: Certificates
) -> None:
    """The origin goes away mid-migration and comes back on the same port: the link comes back
    by itself, with STARTTLS again (nbdkit --tls=require would refuse anything else)."""
    origin_image, data = image_with_data(tmp_path, "origin.img", seed=11)
    options = ("--tls=require", f"--tls-certificates={certs.server}", "--tls-verify-peer")
    port = free_port()
    cache, bitmap, ctl = tmp_path / "p.cache", tmp_path / "p.bm", tmp_path / "p.ctl"
    proxy_args = [*remote_tls_args(certs), "127.0.0.1", str(port), str(cache), str(bitmap)]
    with (
        nbdkit(tmp_path, ["file", str(origin_image)], options=options, port=port) as first,
        running_server("--proxy", *proxy_args, str(ctl), tmp_path=tmp_path) as proxy,
    ):
        head = run(need("qemu-io"), "-r", "-f", "raw", proxy.uri, "-c", "read 0 4M")
        assert head.returncode == 0, head.stderr
        first.kill()
        with nbdkit(tmp_path, ["file", str(origin_image)], options=options, port=port):
            copy = tmp_path / "copy.img"
            assert run(need("nbdcopy"), proxy.uri, str(copy)).returncode == 0
            assert copy.read_bytes() == data
            status = query(ctl)
            assert status["remote_state"] == "connected"
            assert status["remote"] == f"127.0.0.1:{port} (TLS)"
        assert "reconnecting" in proxy.log() or "origin connection ended" in proxy.log()


def test_tls_on_serves_both_kinds_of_client(tmp_path: Path, certs: Certificates) -> None:
    path, data = image_with_data(tmp_path)
    with running_server(
        "--target", "--tls=on", "--tls-certificates", str(certs.server), str(path),
        tmp_path=tmp_path,
    ) as server:  # fmt: skip
        plain = run(need("nbdinfo"), f"nbd://127.0.0.1:{server.port}/")
        assert plain.returncode == 0 and "without TLS" in plain.stdout, plain.stderr
        secure = run(need("nbdinfo"), nbds(server, certs.client))
        assert secure.returncode == 0 and "with TLS" in secure.stdout, secure.stderr
        copy = tmp_path / "copy.img"
        assert run(need("nbdcopy"), nbds(server, certs.client), str(copy)).returncode == 0
        assert copy.read_bytes() == data
    assert server.log().count("TLS started") >= 2


@pytest.mark.nspawn
def test_extended_headers_inside_tls_with_libnbd_1_22(
    trixie_tree: Path, tmp_path: Path, certs: Certificates, tls_server: tuple[ServerProcess, Path]
) -> None:
    """Debian 13's nbdcopy negotiates extended headers after STARTTLS; the data goes both ways
    through the TLS transport with 32-byte requests and replies."""
    server, path = tls_server
    source = tmp_path / "source.img"
    data = random_image(source, SIZE, seed=11)
    uri = nbds(server, certs.client)
    pushed = run_in_tree(
        trixie_tree, ["nbdcopy", "--verbose", str(source), uri], binds=[source, certs.client]
    )
    log = pushed.stdout + pushed.stderr
    assert "negotiated extended headers" in log and "TLS" in log, log[-3000:]
    back = tmp_path / "back.img"
    run_in_tree(trixie_tree, ["nbdcopy", uri, str(back)], binds=[certs.client], writable=[tmp_path])
    assert path.read_bytes() == data
    assert back.read_bytes() == data
