"""xnbd-wrapper under real systemd 252 as PID 1 (systemd-nspawn on the cached Debian tree), with
the shipped xnbd-wrapper.socket and xnbd-wrapper.service exactly as they are.

As in test_nspawn.py the container runs this work tree with Debian's python3, trio 0.22 and
python3-systemd through small scripts in /usr/local/bin (systemd finds them on its executable
search path, as it would the packaged /usr/bin ones); units are bound in read-only and the
unit's StateDirectory (/var/lib/xnbd: images and the state database) read-write, so the host
can check every byte. NBD clients run on the host inside the container's network namespace.
One boot serves the whole module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import REPO, Container, missing_tools

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nspawn,
    pytest.mark.skipif(
        bool(missing_tools("nbdinfo", "nbdcopy")), reason="nbdinfo, nbdcopy (libnbd-bin) missing"
    ),
]

PORT = 8520  # xnbd-wrapper.socket's ListenStream
CONTROL = "/run/xnbd-wrapper.ctl"  # its second ListenStream, the service's --socket
SERVICE = "xnbd-wrapper.service"
SOCKET = "xnbd-wrapper.socket"
IMAGE_SIZE = 8 << 20
EXPORTS = {"alpha": "/var/lib/xnbd/alpha.img", "beta": "/var/lib/xnbd/beta.img"}

PROGRAMS = {
    "xnbd-server": "xnbdd.cli.server",
    "xnbd-bgctl": "xnbdd.cli.bgctl",
    "xnbd-wrapper": "xnbdd.cli.wrapper",
    "xnbd-wrapper-ctl": "xnbdd.cli.wrapper_ctl",
}
SCRIPT = (
    "#!/bin/sh\nPYTHONPATH=/opt/xnbdd exec /usr/bin/python3 -c "
    "'import sys; from {module} import main; sys.exit(main())' \"$@\"\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /var/lib/xnbd: the two images and, later, the state database."""
    path = tmp_path_factory.mktemp("wrapper-data")
    for image in EXPORTS.values():
        with open(path / os.path.basename(image), "wb") as f:
            f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def box(
    systemd_tree: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("nspawn-wrapper")
    binds = {str(REPO): "/opt/xnbdd", str(data): "/var/lib/xnbd"}
    for program, module in PROGRAMS.items():
        script = work / program
        script.write_text(SCRIPT.format(module=module))
        script.chmod(0o755)
        binds[str(script)] = f"/usr/local/bin/{program}"
    for unit in sorted((REPO / "units").glob("xnbd-wrapper.*")):
        binds[str(unit)] = f"/etc/systemd/system/{unit.name}"
    container = Container(systemd_tree, work, binds, writable=(str(data),))
    yield container
    container.poweroff()


def listed(box: Container) -> dict[str, int]:
    """Export name -> size, as `nbdinfo --list` sees them on the wrapper's port."""
    out = box.in_net("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{PORT}").stdout
    return {e["export-name"]: e["export-size"] for e in json.loads(out)["exports"]}


def ctl(box: Container, *args: str) -> str:
    return box.run("xnbd-wrapper-ctl", "-s", CONTROL, *args).stdout


def write_at(box: Container, name: str, offset_mib: int, payload: bytes, tmp_path: Path) -> None:
    src = tmp_path / f"{name}-src.bin"
    src.write_bytes(b"\0" * (offset_mib << 20) + payload)
    box.in_net("nbdcopy", str(src), f"nbd://127.0.0.1:{PORT}/{name}")


def read_all(box: Container, name: str, tmp_path: Path) -> bytes:
    back = tmp_path / f"{name}-back.bin"
    box.in_net("nbdcopy", f"nbd://127.0.0.1:{PORT}/{name}", str(back))
    return back.read_bytes()


def export_server_pids(box: Container) -> set[str]:
    """PIDs (container namespace) of running xnbd-server processes started by the wrapper."""
    out = box.run("pgrep", "-f", "--", "--handoff-socket", check=False).stdout
    return set(out.split())


def test_shipped_wrapper_units_pass_verify_inside(box: Container) -> None:
    proc = box.run("systemd-analyze", "verify", "--man=no", SOCKET, SERVICE, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_wrapper_socket_activation_exports_restart(
    box: Container, data: Path, tmp_path: Path
) -> None:
    box.run("systemctl", "start", SOCKET)
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"

    # The first NBD connection starts the service (Accept=no); nothing is exported yet.
    assert listed(box) == {}
    state = box.show(SERVICE, "ActiveState", "SubState", "TriggeredBy", "MainPID")
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert state["TriggeredBy"] == SOCKET
    main_pid = state["MainPID"]
    # It serves the sockets systemd passed instead of binding its own.
    assert box.run("ss", "-Hltn", f"sport = :{PORT}").stdout.count("LISTEN") == 1

    # Two exports added at run time over the control socket systemd holds.
    for name, image in EXPORTS.items():
        ctl(box, "--add-target", name, image)
    listing = ctl(box, "--list")
    assert all(f"{n}  ({i})" in listing for n, i in EXPORTS.items()), listing
    assert listed(box) == {name: IMAGE_SIZE for name in EXPORTS}

    # A real client writes and reads through each; the bytes land in each image file.
    payloads = {name: os.urandom(1 << 20) for name in EXPORTS}
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        write_at(box, name, offset, payload, tmp_path)
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        got = read_all(box, name, tmp_path)
        assert len(got) == IMAGE_SIZE
        assert got[offset << 20 : (offset + 1) << 20] == payload
        on_disk = (data / os.path.basename(EXPORTS[name])).read_bytes()
        assert on_disk[offset << 20 : (offset + 1) << 20] == payload
    servers = export_server_pids(box)
    assert len(servers) == 2, servers  # one server per export, shared by its clients

    # Stopping the service stops the export servers too, gracefully; the database is saved.
    box.run("systemctl", "stop", SERVICE)
    state = box.show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert export_server_pids(box) == set()
    db = json.loads((data / "xnbd.state").read_text())
    assert db["version"] == 2 and set(db["images"]) == set(EXPORTS), db

    # Started again, it restores both exports from the database, with the data written before.
    box.run("systemctl", "start", SERVICE)
    assert box.show(SERVICE, "MainPID")["MainPID"] != main_pid
    assert listed(box) == {name: IMAGE_SIZE for name in EXPORTS}
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        assert read_all(box, name, tmp_path)[offset << 20 : (offset + 1) << 20] == payload

    # journalctl -u has the wrapper's lines: listening, the exports, every hand-over by client.
    entries = [
        e for e in box.journal("-u", SERVICE) if e.get("SYSLOG_IDENTIFIER") == "xnbd-wrapper"
    ]
    text = [str(e["MESSAGE"]) for e in entries]
    assert any(m.startswith("listening on ") and f":{PORT}" in m for m in text), text
    assert sum(m == "stopped" for m in text) == 1, text
    # The stop was the wrapper's own: each export server ended cleanly before it did.
    stop = text.index("shutdown requested")
    ended = [m for m in text[stop : text.index("stopped")] if " ended, exit status 0" in m]
    assert sorted(m.split(":")[0] for m in ended) == [f"export {n!r}" for n in EXPORTS], text
    servers_said = [
        str(e["MESSAGE"])
        for e in box.journal("-u", SERVICE)
        if e.get("SYSLOG_IDENTIFIER") == "xnbd-server"  # children in the wrapper's cgroup
    ]
    assert servers_said.count("stopping: finishing requests in flight") >= 2, servers_said
    for name in EXPORTS:
        assert f"export {name!r} added" in text, text
        handed = [
            e for e in entries if str(e["MESSAGE"]).startswith(f"client handed to export {name!r}")
        ]
        assert len(handed) >= 3, text  # nbdcopy write, read, read after the restart
        # ListenStream=8520 is one dual-stack socket; IPv4 clients are still logged as IPv4.
        peers = [str(e["XNBD_CLIENT"]) for e in handed]
        assert all(re.fullmatch(r"127\.0\.0\.1:\d+", p) for p in peers), peers  # IPv4 form
        assert all(e["_SYSTEMD_UNIT"] == SERVICE for e in handed)

    box.run("systemctl", "stop", SERVICE, SOCKET)
    assert box.show(SERVICE, "Result")["Result"] == "success"
