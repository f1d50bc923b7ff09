"""The shipped units under real systemd 252 as PID 1 (systemd-nspawn on the cached Debian tree).

The container runs the daemon from this work tree with Debian's own python3, trio 0.22 and
python3-systemd: /usr/local/bin/xnbd-server is a two-line wrapper around `python3 -m xnbdd`
(systemd finds it through its executable search path, as it finds the packaged /usr/bin one).
Units and configuration are bound in read-only, the images directory read-write, so every byte a
client writes can be checked on the host. Clients run on the host inside the container's network
namespace.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import Container, checkout_binds, missing_tools

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nspawn,
    pytest.mark.skipif(
        bool(missing_tools("nbdinfo", "nbdcopy")), reason="nbdinfo, nbdcopy (libnbd-bin) missing"
    ),
]

DISK_PORT = 10811  # xnbd@disk.service listens itself (lport in disk.conf)
SOCKET_PORT = 8520  # xnbd@sock.socket, the unit's default ListenStream
CONN_PORT = 10809  # xnbd-conn.socket
IMAGE_SIZE = 32 << 20

CONFIGS = {
    "disk.conf": "mode = target\nimage = /var/lib/xnbd/disk.img\nlport = 10811\n",
    "sock.conf": "mode = target\nimage = /var/lib/xnbd/sock.img\n",
    "xnbd-conn.conf": "mode = target\nimage = /var/lib/xnbd/conn.img\n",
    "bad.conf": "mode = target\nimage = /var/lib/xnbd/disk.img\nlport = abc\n",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /var/lib/xnbd: the images, and the snapshots taken of them."""
    path = tmp_path_factory.mktemp("images")
    for name in ("disk.img", "sock.img", "conn.img"):
        with open(path / name, "wb") as f:
            f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def box(
    systemd_tree: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("nspawn")
    etc = work / "etc-xnbd"
    etc.mkdir()
    for name, text in CONFIGS.items():
        (etc / name).write_text(text)
    binds = checkout_binds(work, data, etc)
    container = Container(systemd_tree, work, binds, writable=(str(data),))
    yield container
    container.poweroff()


def wait(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def daemon_entries(box: Container, unit: str) -> list[dict[str, object]]:
    return [e for e in box.journal("-u", unit) if e.get("SYSLOG_IDENTIFIER") == "xnbd-server"]


def messages(box: Container, unit: str) -> list[str]:
    return [str(e["MESSAGE"]) for e in daemon_entries(box, unit)]


def round_trip(box: Container, uri: str, tmp_path: Path, offset_mib: int = 0) -> bytes:
    """Write 1 MiB of random data at offset_mib with nbdcopy, read the export back, compare."""
    payload = os.urandom(1 << 20)
    src = tmp_path / "src.bin"
    src.write_bytes(b"\0" * (offset_mib << 20) + payload)
    box.in_net("nbdcopy", str(src), uri)
    back = tmp_path / "back.bin"
    box.in_net("nbdcopy", uri, str(back))
    got = back.read_bytes()
    assert len(got) == IMAGE_SIZE
    assert got[offset_mib << 20 : (offset_mib + 1) << 20] == payload
    return payload


def test_shipped_units_pass_verify_inside(box: Container) -> None:
    """The files exactly as shipped, with xnbd-server found through systemd's search path."""
    proc = box.run(
        "systemd-analyze", "verify", "--man=no",
        "xnbd@disk.service", "xnbd@sock.socket", "xnbd-conn.socket",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_service_lifecycle(box: Container, data: Path, tmp_path: Path) -> None:
    unit = "xnbd@disk.service"
    box.run("systemctl", "start", unit)  # Type=notify: returns once READY=1 arrived
    # Active only when serving: the very first connection after `start` succeeds, no retry.
    info = box.in_net("nbdinfo", f"nbd://127.0.0.1:{DISK_PORT}/disk").stdout
    assert "export-size: 33554432" in info
    state = box.show(unit, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert state["StatusText"].startswith("target /var/lib/xnbd/disk.img: "), state
    pid = state["MainPID"]

    # A client writes and reads; the bytes are in the image file on the host.
    payload = round_trip(box, f"nbd://127.0.0.1:{DISK_PORT}/disk", tmp_path, offset_mib=3)
    with open(data / "disk.img", "rb") as f:
        f.seek(3 << 20)
        assert f.read(1 << 20) == payload

    # SIGUSR1: a snapshot next to the image (writable through ReadWritePaths/StateDirectory).
    before = set(os.listdir(data))
    box.run("systemctl", "kill", "-s", "USR1", unit)
    done = re.compile(r"snapshot \S+: \d+ bytes by \w+")  # the end of a background copy too
    wait(lambda: any(done.match(m) for m in messages(box, unit)), "snapshot line")
    snapshots = list(set(os.listdir(data)) - before)
    assert len(snapshots) == 1, snapshots
    digest = hashlib.sha256((data / snapshots[0]).read_bytes()).hexdigest()
    assert digest == hashlib.sha256((data / "disk.img").read_bytes()).hexdigest()
    (data / snapshots[0]).unlink()

    # SIGUSR2 has nothing to switch in target mode: one clear line, nothing else.
    box.run("systemctl", "kill", "-s", "USR2", unit)
    wait(lambda: any("SIGUSR2" in m for m in messages(box, unit)), "SIGUSR2 line")
    box.run("systemctl", "reload", unit)
    wait(lambda: any(m.startswith("reloaded") for m in messages(box, unit)), "reload line")
    assert box.show(unit, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}

    # journalctl -u shows the daemon's structured fields.
    entries = daemon_entries(box, unit)
    assert entries
    for e in entries:
        assert e["_SYSTEMD_UNIT"] == unit and e["_TRANSPORT"] == "journal"
        assert e["XNBD_EXPORT"] == "disk" and e["XNBD_MODE"] == "target"
        assert {"PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC"} <= set(e)
    clients = [e for e in entries if e["MESSAGE"] == "client connected"]
    assert len(clients) >= 3  # nbdinfo and the two nbdcopy runs
    assert all(str(e["XNBD_CLIENT"]).startswith("127.0.0.1:") for e in clients)

    box.run("systemctl", "stop", unit)
    state = box.show(unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
        "NRestarts": "0",
    }
    assert messages(box, unit)[-1] == "stopped"


def test_watchdog_restarts_a_wedged_daemon(box: Container) -> None:
    unit = "xnbd@disk.service"
    dropin = f"/run/systemd/system/{unit}.d"
    box.run(
        "sh", "-c",
        f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2s\\nTimeoutAbortSec=1s\\n"
        f"RestartSec=200ms\\n' > {dropin}/watchdog.conf && systemctl daemon-reload",
    )  # fmt: skip
    try:
        box.run("systemctl", "start", unit)
        first = box.show(unit, "MainPID")["MainPID"]
        time.sleep(3)  # longer than WatchdogSec: the pings keep it alive
        assert box.show(unit, "ActiveState", "NRestarts") == {
            "ActiveState": "active",
            "NRestarts": "0",
        }
        box.run("systemctl", "kill", "-s", "STOP", unit)  # the event loop stops: no more pings
        wait(lambda: box.show(unit, "NRestarts")["NRestarts"] == "1", "a watchdog restart")
        wait(lambda: box.show(unit, "ActiveState")["ActiveState"] == "active", "the restart")
        assert box.show(unit, "MainPID")["MainPID"] != first
        log = box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
        assert "Watchdog timeout" in log
    finally:
        box.run("systemctl", "stop", unit, check=False)
        box.run("sh", "-c", f"rm -rf {dropin} && systemctl daemon-reload")
        box.run("systemctl", "reset-failed", check=False)


def test_socket_unit_starts_the_service_on_first_connect(box: Container, tmp_path: Path) -> None:
    box.run("systemctl", "start", "xnbd@sock.socket")
    try:
        assert box.show("xnbd@sock.service", "ActiveState")["ActiveState"] == "inactive"
        round_trip(box, f"nbd://127.0.0.1:{SOCKET_PORT}/sock", tmp_path)
        state = box.show("xnbd@sock.service", "ActiveState", "TriggeredBy")
        assert state == {"ActiveState": "active", "TriggeredBy": "xnbd@sock.socket"}
        # It serves the socket systemd passed (on every address) instead of binding its own.
        assert any(
            m.startswith("listening on ") and f":{SOCKET_PORT}" in m
            for m in messages(box, "xnbd@sock.service")
        )
        assert box.run("ss", "-Hltn", f"sport = :{SOCKET_PORT}").stdout.count("LISTEN") == 1
    finally:
        box.run("systemctl", "stop", "xnbd@sock.socket", "xnbd@sock.service", check=False)
    assert box.show("xnbd@sock.service", "Result")["Result"] == "success"


CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=20)\n"
    "assert s.recv(8, socket.MSG_WAITALL) == b'NBDMAGIC'\n"
    "print('connected', flush=True)\n"
    "sys.stdin.readline()\n"
)


def test_per_connection_pair_serves_each_client_in_its_own_process(
    box: Container, tmp_path: Path
) -> None:
    box.run("systemctl", "start", "xnbd-conn.socket")
    clients = [box.popen_in_net(sys.executable, "-c", CLIENT, str(CONN_PORT)) for _ in range(2)]
    try:
        for c in clients:
            assert c.stdout is not None and c.stdout.readline() == "connected\n"
        units = box.run(
            "systemctl", "list-units", "--plain", "--no-legend", "--state=running", "xnbd-conn@*"
        ).stdout.split()
        instances = [u for u in units if u.startswith("xnbd-conn@")]
        assert len(instances) == 2, units
        # systemd names them <prefix>@<n>-<local address>-<peer address>.service
        assert all(
            re.fullmatch(rf"xnbd-conn@\d+-127\.0\.0\.1:{CONN_PORT}-127\.0\.0\.1:\d+\.service", u)
            for u in instances
        ), instances
        pids = {box.show(u, "MainPID")["MainPID"] for u in instances}
        assert len(pids) == 2 and "0" not in pids
        assert box.show("xnbd-conn.socket", "NConnections")["NConnections"] == "2"
    finally:
        for c in clients:
            c.communicate(timeout=20)  # closes its stdin (the client leaves) and every pipe
    # Each process exits when its client leaves; the instances are gone.
    wait(
        lambda: box.show("xnbd-conn.socket", "NConnections")["NConnections"] == "0",
        "both connection processes to exit",
    )
    round_trip(box, f"nbd://127.0.0.1:{CONN_PORT}/", tmp_path)
    entries = [
        e for e in box.journal("-u", "xnbd-conn@*") if e.get("MESSAGE") == "client connected"
    ]
    assert len({e["_PID"] for e in entries}) >= 4  # 2 waiting clients + the nbdcopy connections
    assert all(str(e["_SYSTEMD_UNIT"]).startswith("xnbd-conn@") for e in entries)
    box.run("systemctl", "stop", "xnbd-conn.socket")


def test_configuration_error_fails_clearly_without_restart_loop(box: Container) -> None:
    unit = "xnbd@bad.service"
    assert box.run("systemctl", "start", unit, check=False).returncode != 0
    time.sleep(2.5)  # longer than RestartSec
    state = box.show(unit, "ActiveState", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "ExecMainStatus": "2", "NRestarts": "0"}, state
    log = box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
    assert "/etc/xnbd/bad.conf: key 'lport': not a port number: 'abc'" in log
    box.run("systemctl", "reset-failed", unit)
