"""Restarts that keep the clients: systemd's file-descriptor store (docs/handover.md).

Real systemd as PID 1 in systemd-nspawn on the cached Debian 12 tree (systemd 252), then on the
Debian 13 tree (257), the shipped xnbd@.service (FileDescriptorStoreMax=, Environment=FDSTORE=),
the daemon from this work tree with Debian's python3, trio and python3-systemd. The client is
the host's python3-libnbd (verify_client.py) in the container's network namespace, writing
checksummed blocks and reading them back while `systemctl restart` replaces the server under it.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.handover_client import Client, has_libnbd
from tests.e2e.systemd_fixtures import Container, checkout_binds, missing_tools

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nspawn,
    pytest.mark.skipif(bool(missing_tools("nbdinfo")), reason="nbdinfo (libnbd-bin) missing"),
]

PORT = 10811
UNIT = "xnbd@disk.service"
URI = f"nbd://127.0.0.1:{PORT}/disk"
IMAGE_SIZE = 32 << 20
RESTARTS = 20
COW_PORT, COW_UNIT = 10812, "xnbd@cow.service"
ORIGIN_PORT, PROXY_PORT, PROXY_UNIT = 10813, 10814, "xnbd@proxy.service"
PROXY_CONTROL = "/run/xnbd/proxy/control.sock"
PROXY_SIZE = 256 << 20
HANDED_OVER_PROGRESS = 5.0  # seconds for the handed-over client's next progress step
WORK_PORT, WORK_UNIT = 10815, "xnbd@work.service"
WORK_CONTROL = "/run/xnbd/work/control.sock"
CONFIGS = {
    "work.conf": (
        f"mode = target\nimage = /var/lib/xnbd/work.img\nlport = {WORK_PORT}\n"
        f"workers = 2\ncontrol-socket = {WORK_CONTROL}\n"
    ),
    "disk.conf": f"mode = target\nimage = /var/lib/xnbd/disk.img\nlport = {PORT}\n",
    "cow.conf": f"mode = cow_target\nimage = /var/lib/xnbd/cow.img\nlport = {COW_PORT}\n",
    "origin.conf": f"mode = target\nimage = /var/lib/xnbd/origin.img\nlport = {ORIGIN_PORT}\n",
    "proxy.conf": (
        f"mode = proxy\nlport = {PROXY_PORT}\n"
        f"remote-host = 127.0.0.1\nremote-port = {ORIGIN_PORT}\n"
        "cache-image = /var/lib/xnbd/proxy.cache\ncache-bitmap = /var/lib/xnbd/proxy.bitmap\n"
        f"control-socket = {PROXY_CONTROL}\n"
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /var/lib/xnbd: the images (and the cow overlays beside them)."""
    path = tmp_path_factory.mktemp("fdstore-data")
    for name in ("disk.img", "cow.img", "work.img"):
        with open(path / name, "wb") as f:
            f.truncate(IMAGE_SIZE)
    # Large enough that --cache-all, one block per request, is still running after 3 restarts:
    # data everywhere (the proxy caches an origin's holes without fetching them).
    with open(path / "origin.img", "wb") as f:
        f.write(random.Random(11).randbytes(IMAGE_SIZE))
        filler = random.Random(12).randbytes(1 << 20)
        for _ in range((PROXY_SIZE - IMAGE_SIZE) >> 20):
            f.write(filler)
    return path


@pytest.fixture(scope="module")
def etc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /etc/xnbd (bound read-only there, changed from here)."""
    path = tmp_path_factory.mktemp("fdstore-etc")
    for name, text in CONFIGS.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module", params=["systemd_tree", "trixie_tree"], ids=["252", "257"])
def box(
    request: pytest.FixtureRequest,
    data: Path,
    etc: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    """Debian 12's systemd 252, then Debian 13's 257 (which sets $FDSTORE itself)."""
    systemd_tree: Path = request.getfixturevalue(request.param)
    if not has_libnbd():
        pytest.skip("python3-libnbd is not installed for /usr/bin/python3")
    work = tmp_path_factory.mktemp("nspawn-fdstore")
    binds = checkout_binds(work, data, etc)
    container = Container(systemd_tree, work, binds, writable=(str(data),))
    # systemd refuses a sixth start within 10 s (StartLimitBurst=); this loop restarts faster
    # than anyone would, so it lifts the limit for the test only.
    dropin = "/run/systemd/system/xnbd@.service.d"
    container.run(
        "sh", "-c",
        f"mkdir -p {dropin} && printf '[Unit]\\nStartLimitIntervalSec=0\\n' > {dropin}/limit.conf"
        " && systemctl daemon-reload",
    )  # fmt: skip
    yield container
    container.poweroff()


def wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def stored(box: Container, unit: str = UNIT) -> int:
    return int(box.show(unit, "NFileDescriptorStore")["NFileDescriptorStore"])


def daemon_messages(box: Container, unit: str = UNIT) -> list[str]:
    return [
        str(e["MESSAGE"])
        for e in box.journal("-u", unit)
        if e.get("SYSLOG_IDENTIFIER") == "xnbd-server"
    ]


def test_restarts_keep_a_busy_client(box: Container) -> None:
    """RESTARTS restarts under a client with requests in flight: every request is answered,
    every block reads back as written, and nothing is left in the store once it disconnects."""
    box.run("systemctl", "start", UNIT)
    client = Client(box, URI)
    try:
        client.progress()
        pids = {box.show(UNIT, "MainPID")["MainPID"]}
        restarts: list[tuple[float, float]] = []
        for _ in range(RESTARTS):
            began = time.monotonic()
            box.run("systemctl", "restart", UNIT, timeout=120)  # returns once READY=1 came
            restarts.append((began, time.monotonic()))
            pids.add(box.show(UNIT, "MainPID")["MainPID"])
            client.progress()  # served by the new process before the next restart
            assert stored(box) == 0  # it took its client (and the state) out of the store
        assert len(pids) == RESTARTS + 1
        result = client.quit()
    finally:
        client.kill()
    assert result["error"] == "" and result["verify_errors"] == 0, result
    state = box.show(UNIT, "ActiveState", "NRestarts", "Result")
    assert state == {"ActiveState": "active", "NRestarts": "0", "Result": "success"}, state
    messages = daemon_messages(box)
    assert sum(m == "handed 1 clients over to the service manager" for m in messages) == RESTARTS
    # For the record (pytest -s shows it): the slowest round of each restart, i.e. how long a
    # request waited for the next process.
    worst = sorted(
        max(
            (s for start, s in result["latencies"] if start < end and start + s > began),
            default=0.0,
        )
        for began, end in restarts
    )
    normal = sorted(s for _, s in result["latencies"])
    print(
        f"\n{result['rounds']} rounds of 4 writes + 5 reads of 64 KiB, {RESTARTS} restarts; "
        f"round median {normal[len(normal) // 2] * 1000:.1f} ms; slowest round per restart: "
        f"median {worst[RESTARTS // 2] * 1000:.0f} ms, max {worst[-1] * 1000:.0f} ms; "
        f"`systemctl restart` median {sorted(e - b for b, e in restarts)[RESTARTS // 2]:.2f} s"
    )
    box.run("systemctl", "stop", UNIT)


def test_stop_still_ends_the_client(box: Container) -> None:
    """A real stop is a stop: the handed-over socket is closed by systemd with the store; the
    client sees the connection end at once (no hang), and the store is gone with the service.
    This client keeps sending, so its socket holds unread requests when systemd closes it, and
    the kernel resets the connection (ECONNRESET); an idle client sees end of stream."""
    box.run("systemctl", "start", UNIT)
    client = Client(box, URI)
    try:
        client.progress()
        box.run("systemctl", "restart", UNIT, timeout=120)
        client.progress()
        assert client.proc.poll() is None
        stop_at = time.monotonic()
        box.run("systemctl", "stop", UNIT, timeout=120)
        result = client.finish(timeout=60)
    finally:
        client.kill()
    assert result["verify_errors"] == 0, result
    assert result["error"], result  # the server went away under it
    assert result["ended_at"] >= stop_at - 1
    assert "ECONNRESET" in result["error"] or "disconnected" in result["error"], result
    assert box.show(UNIT, "ActiveState", "Result", "NFileDescriptorStore") == {
        "ActiveState": "inactive",
        "Result": "success",
        "NFileDescriptorStore": "0",
    }
    assert box.run("ss", "-Htn", "state", "established", f"sport = :{PORT}").stdout.strip() == ""
    assert daemon_messages(box)[-1] == "stopped"


def test_cow_target_keeps_its_overlay_across_restarts(box: Container, data: Path) -> None:
    """The clients' writes live in the overlay: it is handed over with them (same file, still
    locked), the base never changes, and the overlay goes once the service stops without them."""
    box.run("systemctl", "start", COW_UNIT)
    client = Client(box, f"nbd://127.0.0.1:{COW_PORT}/cow")
    try:
        client.progress()
        overlays = sorted(p.name for p in data.glob("cow.img.cow*"))
        assert len(overlays) == 2, overlays  # the overlay and its bitmap
        for _ in range(5):
            box.run("systemctl", "restart", COW_UNIT, timeout=120)
            client.progress()
            assert stored(box, COW_UNIT) == 0  # client, overlay and state were taken out
            assert sorted(p.name for p in data.glob("cow.img.cow*")) == overlays
        result = client.quit()
    finally:
        client.kill()
    assert result["error"] == "" and result["verify_errors"] == 0, result
    with open(data / "cow.img", "rb") as f:
        assert not any(f.read())  # every write went to the overlay
    box.run("systemctl", "stop", COW_UNIT)
    assert list(data.glob("cow.img.cow*")) == []
    assert sum("kept across the restart" in m for m in daemon_messages(box, COW_UNIT)) == 5


def test_proxy_keeps_cache_and_clients_and_cache_all_goes_on(box: Container, data: Path) -> None:
    """A proxy restarted during `xnbd-bgctl --cache-all`: its client is handed over, the new
    process reopens cache and bitmap and the origin link, and the cache-all reconnects to the
    control socket and finishes with what was not cached yet."""
    for name in ("proxy.cache", "proxy.bitmap"):  # a cold cache, whichever tree ran before
        (data / name).unlink(missing_ok=True)
    box.run("systemctl", "start", "xnbd@origin.service")  # READY=1: it accepts
    box.run("systemctl", "start", PROXY_UNIT)
    # The client writes only into the first 16 MiB; the rest must end up equal to the origin.
    mine = 16 << 20
    client = Client(box, f"nbd://127.0.0.1:{PROXY_PORT}/", str(mine // (64 * 1024)))
    cache_all = subprocess.Popen(
        ["nsenter", "-t", str(box.leader), "-a", "xnbd-bgctl", "--blocks-per-request", "1",
         "--cache-all", PROXY_CONTROL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client.progress()

        def cached() -> int:
            out = box.run("xnbd-bgctl", "--json", "--query", PROXY_CONTROL).stdout
            return int(json.loads(out)["cached_blocks"])

        total = PROXY_SIZE // 4096
        for _ in range(3):
            before = cached()
            wait(lambda: cached() > before, "cache-all to make progress")  # noqa: B023
            if cache_all.poll() is not None or cached() == total:
                raise AssertionError(f"cache-all finished early: {cache_all.communicate()}")
            box.run("systemctl", "restart", PROXY_UNIT, timeout=120)
            # The handed-over client goes on at once (well under a second) while cache-all runs:
            # with its writes queued behind a window of cache-all's stores it took 4-24 s.
            client.progress(1, timeout=HANDED_OVER_PROGRESS)
        _out, err = cache_all.communicate(timeout=600)
        assert cache_all.returncode == 0, err
        assert err.count("the server restarted; cache-all goes on") >= 3, err
        assert cached() == total
        result = client.quit()
    finally:
        client.kill()
        if cache_all.poll() is None:
            cache_all.kill()
        cache_all.communicate()  # reaps it and closes its pipes, however it ended
    assert result["error"] == "" and result["verify_errors"] == 0, result
    assert stored(box, PROXY_UNIT) == 0
    box.run("systemctl", "stop", PROXY_UNIT, "xnbd@origin.service")
    origin = (data / "origin.img").read_bytes()
    assert (data / "proxy.cache").read_bytes()[mine:] == origin[mine:]


def test_restarts_keep_clients_served_by_worker_processes(box: Container) -> None:
    """Two clients at once move to the daemon's worker processes (xnbdd/workers.py); at each
    restart every worker stops its connection at a request boundary, the daemon stores it, and
    the next process serves it on: no request lost, every block as written."""
    box.run("systemctl", "start", WORK_UNIT)
    uri = f"nbd://127.0.0.1:{WORK_PORT}/"
    clients = [Client(box, uri, "128", "0"), Client(box, uri, "128", "128")]  # disjoint

    def in_workers() -> bool:
        out = box.run("xnbd-bgctl", "--json", "--query", WORK_CONTROL).stdout
        connections = json.loads(out)["connections"]
        return len(connections) == 2 and all(c["worker"] for c in connections)

    try:
        for _ in range(3):
            for client in clients:
                client.progress()
            wait(in_workers, "both clients to be served by workers", timeout=60)
            box.run("systemctl", "restart", WORK_UNIT, timeout=120)
        for client in clients:
            client.progress()
        results = [client.quit() for client in clients]
    finally:
        for client in clients:
            client.kill()
    for result in results:
        assert result["error"] == "" and result["verify_errors"] == 0, result
    messages = daemon_messages(box, WORK_UNIT)
    assert sum(m == "handed 2 clients over to the service manager" for m in messages) == 3
    assert stored(box, WORK_UNIT) == 0
    box.run("systemctl", "stop", WORK_UNIT)


def test_a_restart_into_read_only_closes_the_writers(box: Container, etc: Path) -> None:
    """The configuration turned read-only before the restart: the new process does not serve a
    client that negotiated a writable export (its writes would fail from one request to the
    next); it closes it, says why, and the client reconnects to negotiate again."""
    box.run("systemctl", "start", UNIT)
    client = Client(box, URI)
    try:
        client.progress()
        (etc / "disk.conf").write_text(CONFIGS["disk.conf"] + "readonly = yes\n")
        box.run("systemctl", "restart", UNIT, timeout=120)
        result = client.finish(timeout=60)
    finally:
        client.kill()
        (etc / "disk.conf").write_text(CONFIGS["disk.conf"])
    assert result["verify_errors"] == 0 and result["error"], result
    said = daemon_messages(box)
    assert any("the export's flags changed across the restart" in m for m in said), said[-10:]
    assert stored(box) == 0
    info = box.in_net("nbdinfo", "--json", URI).stdout  # a new client negotiates read-only
    assert '"is_read_only": true' in info
    box.run("systemctl", "stop", UNIT)


def test_a_crash_after_a_handover_closes_the_client(box: Container) -> None:
    """kill -9 of a process serving a client it adopted: the client sees an error at once (and
    reconnects), as with any crash. Had the socket stayed in the store, the next process would
    have it without the requests the dead one had read, and the client would wait forever."""
    box.run("systemctl", "start", UNIT)
    client = Client(box, URI)
    try:
        client.progress()
        box.run("systemctl", "restart", UNIT, timeout=120)
        client.progress()
        box.run("kill", "-9", box.show(UNIT, "MainPID")["MainPID"])
        result = client.finish(timeout=60)
    finally:
        client.kill()
    assert result["verify_errors"] == 0 and result["error"], result
    wait(lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "active", "a crash restart")
    box.run("systemctl", "stop", UNIT)
    box.run("systemctl", "reset-failed", UNIT, check=False)
