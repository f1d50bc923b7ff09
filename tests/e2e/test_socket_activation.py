"""The real daemon started the ways systemd starts it: systemd-socket-activate in listen
(Accept=no), --accept (Accept=yes) and --inetd shapes, and libnbd's own socket activation, with
real NBD clients (nbdinfo, nbdcopy) moving real data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_command, daemon_env
from tests.e2e.systemd_fixtures import REPO, NotifyReceiver, free_port, missing_tools
from tests.libnbd import import_nbd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(missing_tools("systemd-socket-activate", "nbdinfo", "nbdcopy")),
        reason="needs systemd-socket-activate (systemd) and nbdinfo, nbdcopy (libnbd-bin)",
    ),
]


def nbdinfo(uri: str) -> dict[str, object]:
    out = subprocess.run(
        ["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def export_size(info: dict[str, object]) -> int:
    exports = info["exports"]
    assert isinstance(exports, list)
    return int(exports[0]["export-size"])


def round_trip(uri: str, tmp_path: Path, size: int = 1 << 20) -> None:
    """Write random data with nbdcopy, read the whole export back, compare."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=60)
    back = tmp_path / "back.bin"
    subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=60)
    assert back.read_bytes()[:size] == src.read_bytes()


def activate(*args: str, notify: NotifyReceiver | None = None) -> subprocess.Popen[str]:
    """systemd-socket-activate ARGS -- xnbd-server...; it passes only the variables named by -E."""
    env_args = ["-E", f"PYTHONPATH={REPO}"]
    env = daemon_env()
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.address
        env_args += ["-E", "NOTIFY_SOCKET"]
    cmd = [
        "systemd-socket-activate",
        *args[: args.index("--")],
        *env_args,
        *args[args.index("--") :],
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    """The launcher prints "Listening on ..." once its sockets exist."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Listening on" in line and f":{port} " in line:
            return
    raise AssertionError(f"launcher exited without listening (status {proc.wait()})")


def test_listen_mode_tcp4_tcp6_unix(
    image: Path, tmp_path: Path, notify: NotifyReceiver, procs: list[subprocess.Popen[str]]
) -> None:
    p4, p6 = free_port(), free_port("::1")
    path = tmp_path / "nbd.sock"
    launcher = activate(
        "-l",
        f"127.0.0.1:{p4}",
        "-l",
        f"[::1]:{p6}",
        "-l",
        str(path),
        "--fdname=tcp4:tcp6:unix",
        "--",
        *daemon_command("--target", str(image)),
        notify=notify,
    )
    procs.append(launcher)
    wait_listening(p4, launcher)
    # The launcher execs the daemon in place on the first connection; that client is served.
    assert export_size(nbdinfo(f"nbd://127.0.0.1:{p4}/")) == 64 << 20
    ready = notify.wait_for("READY", "1", timeout=20)
    assert ready.pid == launcher.pid  # exec kept the PID, as under a .socket unit
    assert export_size(nbdinfo(f"nbd://[::1]:{p6}/")) == 64 << 20
    round_trip(f"nbd+unix:///?socket={path}", tmp_path)
    launcher.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 0, err
    assert f"listening on 127.0.0.1:{p4}" in err  # the inherited sockets, not its own


def test_accept_mode_one_process_per_connection(
    image: Path, tmp_path: Path, notify: NotifyReceiver, procs: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    launcher = activate(
        "-l",
        f"127.0.0.1:{port}",
        "--accept",
        "--",
        *daemon_command("--target", str(image)),
        notify=notify,
    )
    procs.append(launcher)
    wait_listening(port, launcher)
    a = socket.create_connection(("127.0.0.1", port), timeout=10)
    b = socket.create_connection(("127.0.0.1", port), timeout=10)
    with a, b:
        assert a.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        assert b.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        first = notify.wait_for("READY", "1", timeout=20)
        second = notify.wait_for("READY", "1", timeout=20)
        assert None not in (first.pid, second.pid)
        assert len({first.pid, second.pid, launcher.pid}) == 3  # two children of the launcher
        for child in (first, second):
            assert child.pid is not None and Path(f"/proc/{child.pid}").exists()
    # A child serves one client and exits when it leaves.
    for child in (first, second):
        assert child.pid is not None
        for _ in range(200):
            if not Path(f"/proc/{child.pid}").exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            raise AssertionError(f"connection process {child.pid} outlived its client")
    round_trip(f"nbd://127.0.0.1:{port}/", tmp_path)


def test_inetd_mode(image: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    port = free_port()
    launcher = activate(
        "-l",
        f"127.0.0.1:{port}",
        "--accept",
        "--inetd",
        "--",
        *daemon_command("--inetd", "--target", str(image)),
    )
    procs.append(launcher)
    wait_listening(port, launcher)
    assert export_size(nbdinfo(f"nbd://127.0.0.1:{port}/")) == 64 << 20
    round_trip(f"nbd://127.0.0.1:{port}/", tmp_path)


def test_libnbd_socket_activation(image: Path) -> None:
    """libnbd starts the server itself with LISTEN_FDS, as `nbdinfo -- [ server ]` documents."""
    out = subprocess.run(
        ["nbdinfo", "--json", "--", "[", *daemon_command("--target", str(image)), "]"],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert export_size(json.loads(out)) == 64 << 20


@pytest.mark.parametrize("case", ["other_pid", "not_a_socket"])
def test_bad_environment_is_one_line_and_an_exit(image: Path, tmp_path: Path, case: str) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, open(plain) as f:
        fd = listener.fileno() if case == "other_pid" else f.fileno()
        pid = "1" if case == "other_pid" else "$$"
        # bash puts fd on 3, sets LISTEN_PID (its own PID unless testing another) and execs.
        script = f'LISTEN_FDS=1 LISTEN_PID={pid} exec "$@" 3<&{fd}'
        proc = subprocess.run(
            ["bash", "-c", script, "bash", *daemon_command("--target", str(image))],
            env=daemon_env(),
            pass_fds=[fd],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    expected = "LISTEN_PID=1 is not this process" if case == "other_pid" else "not a socket"
    assert lines[0].startswith("xnbd-server: ") and expected in lines[0]


def multi_conn_of(uri: str) -> bool:
    exports = nbdinfo(uri)["exports"]
    assert isinstance(exports, list)
    return bool(exports[0]["can_multi_conn"])


@pytest.mark.parametrize(
    ("accept", "mode", "multi_conn"),
    [
        (True, "--cow-target", False),  # each connection its own process and overlay
        (False, "--cow-target", True),  # one process, one overlay for every connection
        (True, "--target", True),  # separate processes, but one file: writes are shared
    ],
)
def test_multi_conn_only_where_connections_share_the_data(
    image: Path,
    procs: list[subprocess.Popen[str]],
    accept: bool,
    mode: str,
    multi_conn: bool,
) -> None:
    port = free_port()
    shape = ["--accept"] if accept else []
    launcher = activate("-l", f"127.0.0.1:{port}", *shape, "--", *daemon_command(mode, str(image)))
    procs.append(launcher)
    wait_listening(port, launcher)
    assert multi_conn_of(f"nbd://127.0.0.1:{port}/") is multi_conn


def test_nbdcopy_keeps_to_one_connection_of_a_per_connection_cow_target(
    image: Path, tmp_path: Path, notify: NotifyReceiver, procs: list[subprocess.Popen[str]]
) -> None:
    """nbdcopy opens four connections to an export that offers multi-conn; each would reach its
    own process with its own overlay, a quarter of the writes in each. Without the offer it
    writes and flushes everything through one connection, one process."""
    port = free_port()
    launcher = activate(
        "-l",
        f"127.0.0.1:{port}",
        "--accept",
        "--",
        *daemon_command("--cow-target", str(image)),
        notify=notify,
    )
    procs.append(launcher)
    wait_listening(port, launcher)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 << 20))
    subprocess.run(
        ["nbdcopy", "--connections=4", str(src), f"nbd://127.0.0.1:{port}/"],
        check=True,
        timeout=60,
    )
    # Every connection process said READY before it served, so before nbdcopy exited; a mark
    # sent now queues behind all of them.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"TEST_MARK=1", "\0" + notify.address[1:])
    notify.wait_for("TEST_MARK", "1", timeout=20)
    ready = [n.pid for n in notify.received if n.fields.get("READY") == "1"]
    assert len(ready) == 1, f"{len(ready)} connection processes for one nbdcopy: {ready}"


def test_a_multi_conn_client_reads_back_what_it_wrote_per_connection(
    image: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A client using multi-conn as the spec allows (and as nbdcopy and qemu do): as many
    connections as the server lets it share, writes through one, FLUSH, reads through another.
    A per-connection cow-target must not let it: each connection's process has its own overlay."""
    nbd = import_nbd()
    port = free_port()
    launcher = activate(
        "-l", f"127.0.0.1:{port}", "--accept", "--", *daemon_command("--cow-target", str(image))
    )
    procs.append(launcher)
    wait_listening(port, launcher)
    uri = f"nbd://127.0.0.1:{port}/"
    handles = [nbd.NBD()]
    try:
        handles[0].connect_uri(uri)
        if handles[0].can_multi_conn():
            for _ in range(3):
                handles.append(nbd.NBD())
                handles[-1].connect_uri(uri)
        chunks = [os.urandom(64 << 10) for _ in range(8)]
        for i, chunk in enumerate(chunks):
            handles[i % len(handles)].pwrite(chunk, i << 16)
        handles[0].flush()  # with multi-conn, this covers every connection's writes
        for i, chunk in enumerate(chunks):
            assert handles[(i + 1) % len(handles)].pread(64 << 10, i << 16) == chunk, i
    finally:
        for h in handles:
            h.shutdown()
