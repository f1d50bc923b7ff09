"""xnbd-wrapper under real systemd 252 as PID 1 (systemd-nspawn on the cached Debian tree), with
the shipped xnbd-wrapper.socket, xnbd-wrapper.service and xnbd-export@.service: first with export
servers as children (a drop-in takes --systemd-units off the wrapper's command line), then as the
shipped service runs them, one xnbd-export@NAME.service unit per export.

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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.handover_client import Client, has_libnbd
from tests.e2e.systemd_fixtures import REPO, Container, checkout_binds, missing_tools

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
# A name with '/' and '-': its unit is named by systemd-escape's rules.
ODD_NAME, ODD_IMAGE, ODD_UNIT = (
    "team/disk-1",
    "/var/lib/xnbd/team.img",
    "xnbd-export@team-disk\\x2d1.service",
)
DROPIN_DIR = f"/etc/systemd/system/{SERVICE}.d"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /var/lib/xnbd: the two images and, later, the state database."""
    path = tmp_path_factory.mktemp("wrapper-data")
    for image in [*EXPORTS.values(), ODD_IMAGE]:
        with open(path / os.path.basename(image), "wb") as f:
            f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def box(
    systemd_tree: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("nspawn-wrapper")
    binds = checkout_binds(work, data)
    dropins = work / "dropins"
    dropins.mkdir()
    binds[str(dropins)] = DROPIN_DIR
    container = Container(systemd_tree, work, binds, writable=(str(data), str(dropins)))
    yield container
    container.poweroff()


def listed(box: Container) -> dict[str, int]:
    """Export name -> size, as `nbdinfo --list` sees them on the wrapper's port."""
    out = box.in_net("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{PORT}").stdout
    return {e["export-name"]: e["export-size"] for e in json.loads(out)["exports"]}


def ctl(box: Container, *args: str) -> str:
    return box.run("xnbd-wrapper-ctl", "-s", CONTROL, *args).stdout


def write_at(box: Container, name: str, offset_mib: int, payload: bytes, tmp_path: Path) -> None:
    src = tmp_path / f"{name.replace('/', '_')}-src.bin"
    src.write_bytes(b"\0" * (offset_mib << 20) + payload)
    box.in_net("nbdcopy", str(src), f"nbd://127.0.0.1:{PORT}/{name}")


def read_all(box: Container, name: str, tmp_path: Path) -> bytes:
    back = tmp_path / f"{name.replace('/', '_')}-back.bin"
    box.in_net("nbdcopy", f"nbd://127.0.0.1:{PORT}/{name}", str(back))
    return back.read_bytes()


def export_server_pids(box: Container) -> set[str]:
    """PIDs (container namespace) of running xnbd-server processes started by the wrapper."""
    out = box.run("pgrep", "-f", "--", "--handoff-socket", check=False).stdout
    return set(out.split())


def test_shipped_wrapper_units_pass_verify_inside(box: Container) -> None:
    units = (SOCKET, SERVICE, "xnbd-export@alpha.service", ODD_UNIT)
    proc = box.run("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.fixture
def children_mode(box: Container) -> Iterator[None]:
    """The wrapper's shipped command line without --systemd-units (a drop-in)."""
    text = (REPO / "units" / SERVICE).read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert " --systemd-units" in exec_start
    dropin = f"[Service]\nExecStart=\n{exec_start.replace(' --systemd-units', '')}\n"
    box.run("sh", "-c", f"cat > {DROPIN_DIR}/children.conf", input=dropin)
    box.run("systemctl", "daemon-reload")
    yield
    box.run("rm", f"{DROPIN_DIR}/children.conf")
    box.run("systemctl", "daemon-reload")


@pytest.mark.usefixtures("children_mode")
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


def unit_state(box: Container, unit: str) -> str:
    return box.run("systemctl", "is-active", unit, check=False).stdout.strip()


def test_each_export_is_its_own_unit(box: Container, data: Path, tmp_path: Path) -> None:
    """The shipped service (--systemd-units): xnbd-export@NAME.service per export."""
    (data / "xnbd.state").unlink(missing_ok=True)  # the exports of the test before
    box.run("systemctl", "start", SOCKET)
    assert listed(box) == {}  # activates the wrapper
    wrapper_pid = box.show(SERVICE, "MainPID")["MainPID"]
    exports = {**EXPORTS, ODD_NAME: ODD_IMAGE}
    for name, image in exports.items():
        ctl(box, "--add-target", name, image)
    units = {name: f"xnbd-export@{name}.service" for name in EXPORTS} | {ODD_NAME: ODD_UNIT}
    # Nothing runs before the first client chooses an export.
    assert all(unit_state(box, unit) == "inactive" for unit in units.values())

    payloads = {name: os.urandom(1 << 20) for name in exports}
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        write_at(box, name, offset, payload, tmp_path)
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        got = read_all(box, name, tmp_path)
        assert got[offset << 20 : (offset + 1) << 20] == payload
        on_disk = (data / os.path.basename(exports[name])).read_bytes()
        assert on_disk[offset << 20 : (offset + 1) << 20] == payload

    # Each export is served by its own unit, not by a child of the wrapper.
    for unit in units.values():
        assert unit_state(box, unit) == "active", box.run("systemctl", "status", unit).stdout
        state = box.show(unit, "MainPID", "ControlGroup", "NRestarts")
        assert state["ControlGroup"].endswith(f"/system-xnbd\\x2dexport.slice/{unit}"), state
        assert state["MainPID"] not in ("0", wrapper_pid)
    assert box.run("pgrep", "-P", wrapper_pid, check=False).stdout == ""

    # journalctl -u of the export's unit shows its server and each client the wrapper handed it.
    handed = {
        str(e["XNBD_CLIENT"])
        for e in box.journal("-u", SERVICE, f"_PID={wrapper_pid}")  # not the test before
        if str(e["MESSAGE"]).startswith("client handed to export 'alpha'")
    }
    alpha_log = box.journal("-u", units["alpha"])
    served = {str(e["XNBD_CLIENT"]) for e in alpha_log if e["MESSAGE"] == "client connected"}
    assert len(handed) >= 2 and served == handed, (handed, served)  # nbdcopy write, read
    assert {e["SYSLOG_IDENTIFIER"] for e in alpha_log} >= {"xnbd-server"}

    # Removal stops the export's unit and only that one.
    ctl(box, "--remove-by-exportname", "alpha")
    assert unit_state(box, units["alpha"]) == "inactive"
    assert box.show(units["alpha"], "Result")["Result"] == "success"
    assert unit_state(box, units["beta"]) == "active"
    assert "alpha" not in listed(box)

    # A unit that cannot start: the client gets an error, the wrapper logs systemd's reason.
    (data / "gone.img").write_bytes(b"\0" * 4096)
    ctl(box, "--add-target", "gone", "/var/lib/xnbd/gone.img")
    (data / "gone.img").unlink()
    failed = box.in_net("nbdinfo", f"nbd://127.0.0.1:{PORT}/gone", check=False)
    assert failed.returncode != 0
    reasons = [
        str(e["MESSAGE"])
        for e in box.journal("-u", SERVICE)
        if str(e["MESSAGE"]).startswith("export 'gone' is not available: ")
    ]
    assert reasons and "unit xnbd-export@gone.service failed to start" in reasons[-1], reasons
    assert "journalctl -u xnbd-export@gone.service" in reasons[-1]
    assert unit_state(box, units["beta"]) == "active"  # a failed export disturbs no other

    # Stopping the wrapper stops the rest (PartOf=), all cleanly.
    box.run("systemctl", "stop", SERVICE)
    assert box.show(SERVICE, "Result")["Result"] == "success"
    for name in ("beta", ODD_NAME):
        assert unit_state(box, units[name]) == "inactive"
        assert box.show(units[name], "Result")["Result"] == "success"
    box.run("systemctl", "stop", SOCKET)


def wait_restarted(box: Container, unit: str, old_pid: str, timeout: float = 20.0) -> str:
    """Poll until systemd has the unit running again under a new main PID; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        state = box.show(unit, "ActiveState", "MainPID")
        if state["ActiveState"] == "active" and state["MainPID"] not in ("0", old_pid):
            return state["MainPID"]
        assert time.monotonic() < deadline, (state, box.run("systemctl", "status", unit).stdout)
        time.sleep(0.1)


def test_killed_export_unit_is_restarted_and_serves_again(
    box: Container, data: Path, tmp_path: Path
) -> None:
    """kill -9 of an export's server: systemd restarts its unit (Restart=on-failure), the wrapper
    hands the next client to the new process, and the other export never notices."""
    (data / "xnbd.state").unlink(missing_ok=True)  # the exports of the tests before
    box.run("systemctl", "start", SOCKET)
    assert listed(box) == {}
    wrapper_pid = box.show(SERVICE, "MainPID")["MainPID"]
    for name, image in EXPORTS.items():
        ctl(box, "--add-target", name, image)
    alpha, beta = (f"xnbd-export@{name}.service" for name in EXPORTS)
    payloads = {name: os.urandom(1 << 20) for name in EXPORTS}
    for offset, (name, payload) in enumerate(payloads.items(), start=1):
        write_at(box, name, offset, payload, tmp_path)
    beta_pid = box.show(beta, "MainPID")["MainPID"]
    first = box.show(alpha, "MainPID", "NRestarts")
    assert first["NRestarts"] == "0" and beta_pid not in ("0", first["MainPID"]), first

    # A crash while idle: systemd restarts the unit after RestartSec=, and the next client is
    # handed to the new process with the data written before the crash.
    box.run("kill", "-9", first["MainPID"])
    second_pid = wait_restarted(box, alpha, first["MainPID"])
    assert box.show(alpha, "NRestarts")["NRestarts"] == "1"  # systemd's restart, not the wrapper's
    info = json.loads(box.in_net("nbdinfo", "--json", f"nbd://127.0.0.1:{PORT}/alpha").stdout)
    assert info["exports"][0]["export-size"] == IMAGE_SIZE, info
    assert read_all(box, "alpha", tmp_path)[1 << 20 : 2 << 20] == payloads["alpha"]
    assert box.show(alpha, "MainPID")["MainPID"] == second_pid  # adopted, not started again

    # A crash with a client right behind it (inside RestartSec=): still served, by a new process.
    box.run("kill", "-9", second_pid)
    assert read_all(box, "alpha", tmp_path)[1 << 20 : 2 << 20] == payloads["alpha"]
    third_pid = wait_restarted(box, alpha, second_pid)
    # ... and it writes: 1 MiB more at 3 MiB (the copy repeats what lies before it).
    after = os.urandom(1 << 20)
    src = tmp_path / "alpha-after.bin"
    src.write_bytes(bytes(1 << 20) + payloads["alpha"] + bytes(1 << 20) + after)
    box.in_net("nbdcopy", str(src), f"nbd://127.0.0.1:{PORT}/alpha")
    got = read_all(box, "alpha", tmp_path)
    assert got[1 << 20 : 2 << 20] == payloads["alpha"] and got[3 << 20 : 4 << 20] == after
    assert (data / "alpha.img").read_bytes()[3 << 20 : 4 << 20] == after
    assert box.show(alpha, "MainPID")["MainPID"] == third_pid

    # The other export was never disturbed: the same process all along, its data intact.
    assert box.show(beta, "MainPID", "NRestarts") == {"MainPID": beta_pid, "NRestarts": "0"}
    assert read_all(box, "beta", tmp_path)[2 << 20 : 3 << 20] == payloads["beta"]
    assert box.show(SERVICE, "MainPID")["MainPID"] == wrapper_pid

    # journalctl -u shows both crashes and systemd's restart.
    said = [str(e["MESSAGE"]) for e in box.journal("-u", alpha)]
    killed = [m for m in said if "code=killed, status=9/KILL" in m]
    assert len(killed) == 2, said
    assert any("Scheduled restart job, restart counter is at 1" in m for m in said), said
    pids = {first["MainPID"], second_pid, third_pid}
    assert len(pids) == 3, pids
    # The wrapper saw each server go and handed the next clients to its successor; the one
    # systemd had restarted already was adopted, not restarted again.
    wrapper_said = [str(e["MESSAGE"]) for e in box.journal("-u", SERVICE, f"_PID={wrapper_pid}")]
    for pid in (first["MainPID"], second_pid):
        ended = f"export 'alpha': server (pid {pid}) ended, see systemctl status {alpha}"
        assert ended in wrapper_said, wrapper_said
    for pid in (second_pid, third_pid):
        assert f"client handed to export 'alpha' (pid {pid})" in wrapper_said, wrapper_said
    assert f"export 'alpha': adopting running server (pid {second_pid})" in wrapper_said

    box.run("systemctl", "stop", SERVICE)
    assert box.show(SERVICE, "Result")["Result"] == "success"
    assert unit_state(box, alpha) == "inactive" and unit_state(box, beta) == "inactive"
    box.run("systemctl", "stop", SOCKET)


def wait_active(box: Container, unit: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while unit_state(box, unit) != "active":
        assert time.monotonic() < deadline, box.run("systemctl", "status", unit).stdout
        time.sleep(0.1)


def test_export_unit_restart_keeps_the_wrapper_clients(box: Container, data: Path) -> None:
    """`systemctl restart xnbd-export@alpha`, then of the wrapper itself (as a package upgrade
    does), under a client the wrapper handed over: the export's server hands it to the fd store,
    the next one serves it on (docs/handover.md), every block reads back as written, and the
    store empties after it."""
    if not has_libnbd():
        pytest.skip("python3-libnbd is not installed for /usr/bin/python3")
    (data / "xnbd.state").unlink(missing_ok=True)  # the exports of the tests before
    # Six starts in a minute exceed StartLimitBurst=; lifted here only.
    limit = "/run/systemd/system/xnbd-export@.service.d"
    box.run(
        "sh", "-c",
        f"mkdir -p {limit} && printf '[Unit]\\nStartLimitIntervalSec=0\\n' > {limit}/limit.conf"
        " && systemctl daemon-reload",
    )  # fmt: skip
    box.run("systemctl", "start", SOCKET)
    assert listed(box) == {}
    ctl(box, "--add-target", "alpha", EXPORTS["alpha"])
    alpha = "xnbd-export@alpha.service"
    client = Client(box, f"nbd://127.0.0.1:{PORT}/alpha")
    try:
        client.progress()
        pids = {box.show(alpha, "MainPID")["MainPID"]}
        for _ in range(3):
            box.run("systemctl", "restart", alpha, timeout=120)
            pids.add(box.show(alpha, "MainPID")["MainPID"])
            client.progress()
        # Restarting the wrapper restarts its export units (PartOf=): the same, twice.
        for _ in range(2):
            box.run("systemctl", "restart", SERVICE, timeout=120)
            wait_active(box, alpha)
            pids.add(box.show(alpha, "MainPID")["MainPID"])
            client.progress()
        result = client.quit()
    finally:
        client.kill()
        box.run("sh", "-c", f"rm -r {limit} && systemctl daemon-reload")
    assert result["error"] == "" and result["verify_errors"] == 0, result
    assert len(pids) == 6
    deadline = time.monotonic() + 30
    while box.show(alpha, "NFileDescriptorStore")["NFileDescriptorStore"] != "0":
        assert time.monotonic() < deadline, "the fd store did not empty"
        time.sleep(0.2)
    # A new client after the restarts: the wrapper adopts the new process.
    assert listed(box) == {"alpha": IMAGE_SIZE}
    box.in_net("nbdinfo", f"nbd://127.0.0.1:{PORT}/alpha")
    box.run("systemctl", "stop", SERVICE)
    assert box.show(SERVICE, "Result")["Result"] == "success"
    box.run("systemctl", "stop", SOCKET)
