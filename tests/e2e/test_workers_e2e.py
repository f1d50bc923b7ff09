"""Data-plane worker processes end to end (xnbdd/workers.py): the real daemon with
``--workers 2``, real clients (nbdcopy, python3-libnbd), the control socket's query."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_snapshot_e2e import connected, query, serving, wait_for_log, wait_for_workers
from tests.libnbd import import_nbd
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def nbdcopy() -> str:
    path = shutil.which("nbdcopy")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nbdcopy is required on CI")
        pytest.skip("nbdcopy is not installed")
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, Path]]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    control = tmp_path / "ctl"
    with serving(
        "--target",
        str(image),
        "--workers",
        "2",
        "--control-socket",
        str(control),
        tmp_path=tmp_path,
    ) as srv:
        yield srv, image, control


def test_four_connections_write_and_read_back_through_two_workers(
    daemon: tuple[ServerProcess, Path, Path], tmp_path: Path
) -> None:
    srv, image, control = daemon
    copy = nbdcopy()
    with ExitStack() as stack:
        handles = [stack.enter_context(connected(srv.uri)) for _ in range(4)]
        served = wait_for_workers(control, connections=4)
        spread = Counter(c["worker"] for c in query(control)["connections"])
        assert len(served) == 2 and sorted(spread.values()) == [2, 2], spread
        blocks = [os.urandom(64 * 1024) for _ in handles]
        for n, h in enumerate(handles):
            h.pwrite(blocks[n], n * MiB)
        for n, block in enumerate(blocks):  # read by a connection in another process
            assert handles[(n + 1) % 4].pread(len(block), n * MiB) == block
    source = tmp_path / "source"
    source.write_bytes(os.urandom(32 * MiB))
    args = ["--connections=4", "--requests=16", "--flush"]
    subprocess.run([copy, *args, str(source), srv.uri], check=True, timeout=120)
    back = tmp_path / "back"
    subprocess.run([copy, *args, srv.uri, str(back)], check=True, timeout=120)
    assert back.read_bytes() == source.read_bytes() == image.read_bytes()
    assert set(query(control)["workers"]) == served, "no worker died"


def test_a_killed_worker_closes_its_clients_only_and_the_daemon_stops_cleanly(
    daemon: tuple[ServerProcess, Path, Path],
) -> None:
    srv, _image, control = daemon
    nbd = import_nbd()
    handles: list[Any] = []
    for _ in range(2):
        handles.append(nbd.NBD())
        handles[-1].connect_uri(srv.uri)
    try:
        for n, h in enumerate(handles):
            h.pwrite(bytes([n + 1]) * 4096, n * MiB)
        wait_for_workers(control, connections=2)
        served = {c["client"]: c["worker"] for c in query(control)["connections"]}
        victim = next(iter(served.values()))
        os.kill(victim, signal.SIGKILL)
        wait_for_log(srv, re.compile(rf"worker \d \(pid {victim}\) ended \(signal 9\), 1 conn"))
        results = []
        for n, h in enumerate(handles):
            try:
                results.append(h.pread(4096, n * MiB) == bytes([n + 1]) * 4096)
            except Exception:  # nbd.Error: its connection was closed
                results.append(None)
        assert sorted(results, key=str) == [None, True], results
        # another worker is started; a new client is served as before
        deadline = time.monotonic() + 60
        while len(query(control)["workers"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = query(control)["workers"]
        assert victim not in workers
        survivor = next(h for h, ok in zip(handles, results, strict=True) if ok)
        # a graceful stop with a client in a worker: its worker ends the connection, then exits
        assert srv.stop() == 0, srv.log()
        with pytest.raises(nbd.Error):
            survivor.pread(4096, 0)
    finally:
        handles.clear()  # libnbd closes a handle when it is freed
    assert not any(alive(pid) for pid in workers)
    assert "Traceback" not in srv.log()


def test_cow_target_connections_in_two_workers_share_one_overlay(tmp_path: Path) -> None:
    """Four connections of a cow-target over two workers write parts of the same absent blocks
    (each write copies the base block up first) and read each other's writes; the base file is
    untouched and the overlay goes at stop."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(8 * MiB))
    before = base.read_bytes()
    control = tmp_path / "ctl"
    args = ("--cow-target", str(base), "--workers", "2", "--control-socket", str(control))
    with serving(*args, tmp_path=tmp_path) as srv:
        with ExitStack() as stack:
            handles = [stack.enter_context(connected(srv.uri)) for _ in range(4)]
            served = wait_for_workers(control, connections=4)
            assert len(served) == 2, "the connections are spread over both workers"
            pieces = []
            for block in range(0, 2048, 7):  # 1000-byte pieces: partial, some straddle blocks
                for n, h in enumerate(handles):
                    piece = os.urandom(1000)
                    h.pwrite(piece, block * 4096 + n * 1100)
                    pieces.append((block * 4096 + n * 1100, piece))
            handles[0].flush()
            for i, (offset, piece) in enumerate(pieces):
                assert handles[i % 4].pread(len(piece), offset) == piece, offset
            expected = bytearray(before)
            for offset, piece in pieces:
                expected[offset : offset + len(piece)] = piece
            for n, h in enumerate(handles):  # every connection sees one image
                assert h.pread(MiB, n * 2 * MiB) == expected[n * 2 * MiB :][:MiB]
        assert srv.stop() == 0, srv.log()
    assert base.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".cow" in p], "the overlay is removed"
