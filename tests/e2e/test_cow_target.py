"""cow-target end to end: the real daemon, real clients, a base image that must never change."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import ServerProcess, running_server, server_command, server_env

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
BASE_SIZE = 8 * MiB
# The base: data, hole, data, hole (2 MiB each), so merged block status has both kinds to show.
BASE_DATA = [(0, 2 * MiB), (4 * MiB, 6 * MiB)]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def run(*cmd: str, timeout: float = 60) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_base(path: Path) -> bytearray:
    """A sparse base image with random data in BASE_DATA; returns its content."""
    content = bytearray(BASE_SIZE)
    with open(path, "wb") as f:
        f.truncate(BASE_SIZE)
        for start, stop in BASE_DATA:
            chunk = os.urandom(stop - start)
            content[start:stop] = chunk
            f.seek(start)
            f.write(chunk)
    return content


def overlays(directory: Path, base_name: str = "base.img") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(base_name + ".cow"))


@contextmanager
def serving(*args: str, tmp_path: Path, check_exit: bool = True) -> Iterator[ServerProcess]:
    """running_server, returned once the daemon says it is ready: the port listens before the
    backend is open, so a connectable port does not yet mean the overlay exists."""
    with running_server(*args, tmp_path=tmp_path, check_exit=check_exit) as srv:
        deadline = time.monotonic() + 15
        while "ready: " not in srv.log():
            assert srv.proc.poll() is None, srv.log()
            assert time.monotonic() < deadline, f"not ready:\n{srv.log()}"
            time.sleep(0.02)
        yield srv


@contextmanager
def connected(uri: str, count: int = 1) -> Iterator[list[Any]]:
    nbd = import_nbd()
    handles = []
    try:
        for _ in range(count):
            h = nbd.NBD()
            h.connect_uri(uri)
            handles.append(h)
        yield handles
    finally:
        for h in handles:
            h.shutdown()


def stop_with(srv: ServerProcess, signum: int) -> None:
    srv.proc.send_signal(signum)
    assert srv.proc.wait(15) == 0, srv.log()


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "base.img"
    return path, make_base(path)


def test_writes_are_seen_by_every_client_and_the_base_never_changes(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    need("qemu-io")
    need("nbdcopy")
    path, model = base
    before = sha256(path)
    with serving("--cow-target", str(path), tmp_path=tmp_path) as srv:
        assert overlays(tmp_path) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
        with connected(srv.uri, 2) as (a, b):
            assert a.can_multi_conn()
            # qemu-io: unaligned, crossing base data and a hole; the rest of each block is merged
            run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 2093000 12000", srv.uri)
            model[2093000 : 2093000 + 12000] = b"\x5a" * 12000
            assert b.pread(20000, 2090000) == model[2090000:2110000]
            a.pwrite(b"\xa5" * 100, 4 * MiB + 10)
            model[4 * MiB + 10 : 4 * MiB + 110] = b"\xa5" * 100
            assert b.pread(8192, 4 * MiB) == model[4 * MiB : 4 * MiB + 8192]
            copied = tmp_path / "seen.img"
            run("nbdcopy", srv.uri, str(copied))
            assert copied.read_bytes() == model
            # nbdcopy into the export replaces everything, and both clients see the new image
            payload = tmp_path / "payload.img"
            payload.write_bytes(os.urandom(BASE_SIZE))
            run("nbdcopy", str(payload), srv.uri)
            new = payload.read_bytes()
            for offset in (0, 2 * MiB - 100, 5 * MiB + 3, BASE_SIZE - 4096):
                assert a.pread(4096, offset) == new[offset : offset + 4096]
                assert b.pread(4096, offset) == new[offset : offset + 4096]
        assert sha256(path) == before
    assert sha256(path) == before
    assert overlays(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_overlay_removed_on_clean_stop(
    tmp_path: Path, base: tuple[Path, bytearray], signum: int
) -> None:
    path, _ = base
    with serving("--cow-target", str(path), tmp_path=tmp_path) as srv:
        with connected(srv.uri) as (h,):
            h.pwrite(b"x" * 4096, 0)
            h.flush()
        assert overlays(tmp_path) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
        stop_with(srv, signum)
    assert overlays(tmp_path) == []
    assert "removed copy-on-write overlay" in srv.log()


def test_cow_dir_holds_the_overlay(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    path, model = base
    cow_dir = tmp_path / "overlays"
    cow_dir.mkdir()
    before = sha256(path)
    with serving("--cow-target", str(path), "--cow-dir", str(cow_dir), tmp_path=tmp_path) as srv:
        assert overlays(tmp_path) == []
        assert overlays(cow_dir) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
        with connected(srv.uri) as (h,):
            h.pwrite(b"y" * 8192, MiB)
            assert h.pread(3 * 4096, MiB - 4096) == (model[MiB - 4096 : MiB] + b"y" * 8192)
    assert overlays(cow_dir) == []
    assert sha256(path) == before


def test_stale_overlay_of_a_killed_instance_is_cleaned_at_restart(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    path, model = base
    with serving("--cow-target", str(path), tmp_path=tmp_path, check_exit=False) as srv:
        with connected(srv.uri) as (h,):
            h.pwrite(b"z" * 4096, 0)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(15)
    assert overlays(tmp_path) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
    with serving("--cow-target", str(path), tmp_path=tmp_path) as srv:
        log = srv.log()
        assert f"removed stale copy-on-write overlay {tmp_path}/base.img.cow0.layer1" in log
        # the fresh overlay starts empty: the killed instance's write is gone
        with connected(srv.uri) as (h,):
            assert h.pread(4096, 0) == model[:4096]
        assert overlays(tmp_path) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
    assert overlays(tmp_path) == []


def test_two_live_instances_get_their_own_overlays(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    path, model = base
    with (
        serving("--cow-target", str(path), tmp_path=tmp_path) as first,
        serving("--cow-target", str(path), tmp_path=tmp_path) as second,
    ):
        assert overlays(tmp_path) == [
            "base.img.cow0.layer1",
            "base.img.cow0.layer1.bm",
            "base.img.cow1.layer1",
            "base.img.cow1.layer1.bm",
        ]
        assert "stale" not in second.log()  # a live instance's overlay is not "stale"
        with connected(first.uri) as (a,), connected(second.uri) as (b,):
            a.pwrite(b"1" * 4096, 0)
            b.pwrite(b"2" * 4096, 0)
            assert a.pread(4096, 0) == b"1" * 4096
            assert b.pread(4096, 0) == b"2" * 4096
            assert b.pread(4096, 4096) == model[4096:8192]
    assert overlays(tmp_path) == []


def nbdinfo_map(uri: str) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = json.loads(run("nbdinfo", "--map", "--json", uri))
    return extents


def check_map_is_truthful(extents: list[dict[str, Any]], content: bytearray, size: int) -> None:
    """The map covers the export once, and no extent claims zeros over non-zero bytes."""
    pos = 0
    for e in extents:
        assert e["offset"] == pos
        if e["type"] & 2:  # NBD_STATE_ZERO
            chunk = content[pos : pos + e["length"]]
            assert chunk.count(0) == len(chunk), f"extent {e} claims zeros over data"
        pos += e["length"]
    assert pos == size


def flags_at(extents: list[dict[str, Any]], offset: int) -> int:
    for e in extents:
        if e["offset"] <= offset < e["offset"] + e["length"]:
            return int(e["type"])
    raise AssertionError(f"no extent covers {offset}")


def test_block_status_merges_base_and_overlay(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    need("nbdinfo")
    need("qemu-img")
    path, model = base
    before = sha256(path)
    nbd = import_nbd()
    with serving("--cow-target", str(path), tmp_path=tmp_path) as srv:
        with connected(srv.uri) as (h,):
            h.pwrite(b"\x11" * 64 * KiB, 3 * MiB)  # data over a base hole
            model[3 * MiB : 3 * MiB + 64 * KiB] = b"\x11" * 64 * KiB
            h.trim(128 * KiB, 256 * KiB)  # base data trimmed away
            model[256 * KiB : 384 * KiB] = bytes(128 * KiB)
            h.zero(128 * KiB, 4 * MiB + 512 * KiB)  # base data zeroed, holes allowed
            model[4 * MiB + 512 * KiB : 4 * MiB + 640 * KiB] = bytes(128 * KiB)
            h.zero(64 * KiB, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)
            model[5 * MiB : 5 * MiB + 64 * KiB] = bytes(64 * KiB)
            h.zero(5000, 1 * MiB + 1000)  # unaligned: the edges keep the base bytes
            model[MiB + 1000 : MiB + 6000] = bytes(5000)
            assert h.pread(BASE_SIZE, 0) == model
        extents = nbdinfo_map(srv.uri)
        check_map_is_truthful(extents, model, BASE_SIZE)
        hole_zero = 3
        assert flags_at(extents, 0) == 0  # untouched base data
        assert flags_at(extents, 2 * MiB) == hole_zero  # untouched base hole
        assert flags_at(extents, 3 * MiB) == 0  # overlay data over a base hole
        assert flags_at(extents, 3 * MiB + 64 * KiB) == hole_zero  # back to the base hole
        assert flags_at(extents, 256 * KiB) == hole_zero  # trimmed over base data
        assert flags_at(extents, 4 * MiB + 512 * KiB) == hole_zero  # zeroed over base data
        assert flags_at(extents, 4 * MiB) == 0  # base data next to it
        # zeroed with NO_HOLE: allocated zeros, which a server may report as data or as zero
        # (check_map_is_truthful covers it); it reads as zeros (checked above)
        # qemu-img agrees: the zeroed and trimmed regions are zero, the written one is data
        qmap = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri))
        for offset, zero in [(256 * KiB, True), (3 * MiB, False), (0, False), (2 * MiB, True)]:
            (entry,) = [m for m in qmap if m["start"] <= offset < m["start"] + m["length"]]
            assert entry["zero"] is zero, (offset, entry)
    assert sha256(path) == before


def test_flush_fua_trim_and_write_zeroes_are_answered(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    path, model = base
    nbd = import_nbd()
    with (
        serving("--cow-target", str(path), tmp_path=tmp_path) as srv,
        connected(srv.uri) as (h,),
    ):
        for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert getattr(h, can)(), can
        h.flush()
        h.pwrite(b"F" * 6000, 100, nbd.CMD_FLAG_FUA)
        model[100:6100] = b"F" * 6000
        # FUA: the overlay data and the bitmap covering it are written back before the reply
        layer = tmp_path / "base.img.cow0.layer1"
        assert layer.read_bytes()[100:6100] == b"F" * 6000
        assert (tmp_path / "base.img.cow0.layer1.bm").read_bytes()[0] & 0b11 == 0b11
        h.trim(8192, 16384, nbd.CMD_FLAG_FUA)
        model[16384:24576] = bytes(8192)
        h.zero(4096, 32768, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
        model[32768:36864] = bytes(4096)
        if h.can_fast_zero():
            h.zero(4096, 40960, nbd.CMD_FLAG_FAST_ZERO)
            model[40960:45056] = bytes(4096)
        h.flush()
        assert h.pread(64 * KiB, 0) == model[: 64 * KiB]
        # zero-length requests are answered (docs/decisions.md D9: the original cow-target crashed)
        h.set_strict_mode(0)  # libnbd refuses a zero count itself otherwise
        h.pwrite(b"", 0)
        h.trim(0, 0)
        h.flush()


def test_readonly_cow_target_refuses_writes_and_makes_no_overlay(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    path, model = base
    before = sha256(path)
    nbd = import_nbd()
    with serving("--cow-target", "--readonly", str(path), tmp_path=tmp_path) as srv:
        assert overlays(tmp_path) == []
        with connected(srv.uri) as (h,):
            assert h.is_read_only()
            h.set_strict_mode(0)  # send the write anyway: the server must refuse it
            with pytest.raises(nbd.Error) as err:
                h.pwrite(b"no" * 2048, 0)
            assert err.value.errno == "EPERM"
            assert h.pread(4096, MiB) == model[MiB : MiB + 4096]
    assert sha256(path) == before


def test_per_connection_instance_removes_its_overlay_when_the_client_leaves(
    tmp_path: Path, base: tuple[Path, bytearray]
) -> None:
    """inetd style (one client on stdin, as xnbd-wrapper --cow spawns them): a private overlay,
    gone when its one client disconnects and the instance exits."""
    path, model = base
    nbd = import_nbd()
    ours, theirs = socket.socketpair()
    log_path = tmp_path / "inetd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_command("--cow-target", "--inetd", str(path)),
            stdin=theirs.fileno(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
        )
    theirs.close()
    try:
        h = nbd.NBD()
        h.connect_socket(ours.detach())  # libnbd owns (and closes) the socket from here
        h.pwrite(b"i" * 4096, 0)
        assert h.pread(8192, 0) == b"i" * 4096 + model[4096:8192]
        assert overlays(tmp_path) == ["base.img.cow0.layer1", "base.img.cow0.layer1.bm"]
        h.shutdown()
        assert proc.wait(15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert overlays(tmp_path) == []
