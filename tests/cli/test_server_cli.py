"""xnbd-server's command line: usage errors, start-up failures, and the one-client sources
(--inetd, --connected-fd, socket activation) driven by real clients."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import REPO, free_port, server_command, server_env

MiB = 1024 * 1024


def xnbd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server_command(*args), capture_output=True, text=True, env=server_env(), timeout=timeout
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    os.truncate(path, 4 * MiB)
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        [],
        ["--target"],
        ["--target", "a", "b"],
        ["--target", "--cow-target", "x"],
        ["--target", "x", "--lport", "70000"],
        ["--target", "x", "--max-queue-size", "lots"],
        ["--proxy", "host", "8520"],
        ["--target", "x", "--inetd", "--connected-fd", "3"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    done = xnbd(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xnbd-server: "), done.stderr
    assert "Traceback" not in done.stderr


def test_missing_image_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = xnbd("--target", str(tmp_path / "nope.img"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"xnbd-server: {tmp_path / 'nope.img'}: no such file or device"
    ]


def test_unreadable_image_is_one_line_and_exit_1(tmp_path: Path) -> None:
    directory = tmp_path / "adir"
    directory.mkdir()
    done = xnbd("--target", str(directory))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_is_one_line_and_exit_1(image: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = xnbd("--target", str(image), "--laddr", "127.0.0.1", "--lport", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"xnbd-server: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_help_and_version_exit_0() -> None:
    helped = xnbd("--help")
    assert helped.returncode == 0 and "--cow-target" in helped.stdout
    version = xnbd("--version")
    assert version.returncode == 0 and version.stdout.startswith("xnbdd ")


def test_inetd_serves_the_client_on_stdin(image: Path) -> None:
    nbd = import_nbd()
    h = nbd.NBD()
    h.connect_command(server_command("--inetd", "--target", str(image)))
    h.pwrite(b"inetd!" * 100, 4096)
    assert h.pread(600, 4096) == b"inetd!" * 100
    h.shutdown()
    assert image.read_bytes()[4096:4696] == b"inetd!" * 100


def test_socket_activation_by_libnbd(image: Path) -> None:
    """libnbd starts the server with LISTEN_FDS/LISTEN_PID, as systemd would."""
    nbd = import_nbd()
    h = nbd.NBD()
    h.connect_systemd_socket_activation(server_command("--target", str(image)))
    assert h.get_size() == 4 * MiB and h.get_structured_replies_negotiated()
    h.pwrite(b"activated", 0)
    h.shutdown()
    assert image.read_bytes()[:9] == b"activated"


def test_connected_fd_starts_in_transmission_and_exits_when_the_client_leaves(
    image: Path,
) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        server_command("--target", str(image), "--connected-fd", str(theirs.fileno())),
        pass_fds=[theirs.fileno()],
        env=server_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    theirs.close()
    with ours:
        # No greeting: the first bytes on the wire are our request's reply.
        ours.sendall(struct.pack("!IHHQQI", 0x25609513, 0, 1, 5, 0, 4) + b"abcd")
        assert struct.unpack("!IIQ", ours.recv(16)) == (0x67446698, 0, 5)
        ours.sendall(struct.pack("!IHHQQI", 0x25609513, 0, 2, 6, 0, 0))  # DISC
    assert proc.wait(15) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    assert image.read_bytes()[:4] == b"abcd"


def test_bad_listen_pid_is_one_line(image: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        fd = listener.fileno()
        env = server_env({"LISTEN_FDS": "1", "LISTEN_PID": "1"})  # PID 1 is not the server
        done = subprocess.run(
            server_command("--target", str(image)),
            capture_output=True,
            text=True,
            env=env,
            pass_fds=[fd],
            preexec_fn=lambda: os.dup2(fd, 3),
            timeout=20,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "LISTEN_PID" in lines[0], done.stderr


def test_config_file_supplies_mode_and_image_and_errors_name_file_and_key(
    image: Path, tmp_path: Path
) -> None:
    nbd = import_nbd()
    good = tmp_path / "disk.conf"
    good.write_text(f"mode = target\nimage = {image}\nreadonly = yes\n")
    h = nbd.NBD()
    h.connect_systemd_socket_activation(server_command("--config", str(good)))
    assert h.is_read_only() and h.get_size() == 4 * MiB
    h.shutdown()
    bad = tmp_path / "bad.conf"
    bad.write_text(f"mode = target\nimage = {image}\nlport = many\n")
    done = xnbd("--config", str(bad))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert str(bad) in line and "lport" in line


def test_daemonize_detaches_after_start_up_and_keeps_relative_paths(
    image: Path, tmp_path: Path
) -> None:
    nbd = import_nbd()
    port = free_port()
    done = subprocess.run(
        server_command(
            "--target",
            image.name,
            "--daemonize",
            "--laddr",
            "127.0.0.1",
            "--lport",
            str(port),
            "--logpath",
            "server.log",
        ),
        cwd=image.parent,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    marker = f"--lport\0{port}\0"
    pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and marker in (p / "cmdline").read_text(errors="replace")
    ]
    try:
        assert len(pids) == 1
        log = image.parent / "server.log"  # relative --logpath, resolved before detaching
        deadline = time.monotonic() + 10
        while "ready: " not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/")
        h.pwrite(b"daemon", 0)
        h.shutdown()
        assert image.read_bytes()[:6] == b"daemon"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)


def test_ipv4_clients_of_a_dual_stack_socket_are_logged_as_ipv4(
    image: Path, tmp_path: Path
) -> None:
    """systemd's ListenStream=PORT is one IPv6 socket that also takes IPv4 clients; they are
    logged as 127.0.0.1:N, not [::ffff:127.0.0.1]:N."""
    nbd = import_nbd()
    port, log = free_port(), tmp_path / "server.log"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(port),
            "-E",
            f"PYTHONPATH={REPO}",
            *server_command("--target", str(image), "--logpath", str(log)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                h = nbd.NBD()
                h.connect_uri(f"nbd://127.0.0.1:{port}/")
                break
            except nbd.Error:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        h.shutdown()
        while "client disconnected" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "[client=127.0.0.1:" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-certificates", "/etc/xnbd/tls"], "need --tls on or require"),
        (["--tls-verify-peer"], "need --tls on or require"),
        (["--tls=on", "--tls-psk", "/k", "--tls-verify-peer"], "--tls-psk excludes"),
        (["--tls=on", "--oldstyle"], "oldstyle handshake has no STARTTLS"),
        (["--tls=require", "--connected-fd", "3"], "negotiated already"),
        (["--remote-tls-ca", "/ca.pem"], "need --remote-tls"),
        (["--remote-tls"], "--remote-tls is for --proxy mode"),
        (["--tls=maybe"], "invalid choice"),
    ],
)
def test_tls_combinations_are_usage_errors(args: list[str], message: str) -> None:
    from xnbdd.cli.common import UsageError
    from xnbdd.cli.server import parse

    with pytest.raises(UsageError, match=message.replace("-", "\\-")):
        parse(["--target", *args, "/img"])


def test_tls_settings_reach_the_options(tmp_path: Path) -> None:
    from xnbdd.cli.server import make_options, parse
    from xnbdd.proto.handshake import TLSPolicy

    conf = tmp_path / "x.conf"
    conf.write_text("tls = require\ntls-certificates = /etc/xnbd/tls\ntls-verify-peer = yes\n")
    opts = make_options(parse(["--target", "--config", str(conf), "/img"]))
    assert opts.tls.mode is TLSPolicy.REQUIRE and opts.tls.verify_peer
    assert opts.tls.certificates == "/etc/xnbd/tls"
    proxy = make_options(
        parse(["--proxy", "--remote-tls", "--remote-tls-ca", "ca.pem", "h", "1", "c", "b", "s"])
    )
    assert proxy.remote_tls is not None and proxy.remote_tls.ca == os.path.abspath("ca.pem")
    assert proxy.tls.mode is TLSPolicy.OFF


def test_lifetime_and_rotational_settings_reach_the_options(tmp_path: Path) -> None:
    """The file's pid-file and rotational keys, and the command line over them."""
    from xnbdd.cli.server import make_options, parse

    conf = tmp_path / "x.conf"
    conf.write_text("pid-file = /run/xnbd/x.pid\nrotational = yes\n")
    opts = make_options(parse(["--target", "--config", str(conf), "/img"]))
    assert opts.pid_file == "/run/xnbd/x.pid" and opts.rotational is True
    over = parse(["--target", "--config", str(conf), "--no-rotational", "--pid-file", "p", "/img"])
    assert make_options(over).rotational is False
    assert make_options(over).pid_file == os.path.abspath("p")
    default = make_options(parse(["--target", "/img"]))
    assert default.rotational is None and default.pid_file == ""  # None: ask sysfs
    assert parse(["--target", "--exit-with-parent", "/img"]).exit_with_parent
