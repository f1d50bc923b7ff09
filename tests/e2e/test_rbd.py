"""``--target rbd:POOL/IMAGE[@SNAP]`` against a real single-node Ceph cluster (tests/e2e/ceph.py),
driven by real NBD clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.e2e.ceph import CephCluster
from tests.libnbd import import_nbd
from tests.serverproc import (
    ServerProcess,
    free_port,
    running_server,
    server_command,
    server_env,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture
def rbd_image(ceph: CephCluster) -> Iterator[str]:
    """A fresh 32 MiB image (``POOL/NAME``), removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield ceph.create_image(name, 32 * MiB)
    ceph.remove_image(name)


def serve(
    ceph: CephCluster, image: str, tmp_path: Path, *extra: str
) -> AbstractContextManager[ServerProcess]:
    return running_server(
        "--target", f"rbd:{image}", "--rbd-conf", str(ceph.conf), *extra, tmp_path=tmp_path
    )


def test_nbdcopy_round_trip_lands_in_the_cluster(
    ceph: CephCluster, rbd_image: str, tmp_path: Path
) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(24 * MiB) + bytes(8 * MiB))
    back = tmp_path / "back.img"
    with serve(ceph, rbd_image, tmp_path) as srv:
        run("nbdcopy", "--connections=4", str(source), srv.uri)
        run("nbdcopy", srv.uri, str(back))
    assert back.read_bytes() == source.read_bytes()
    # In the cluster itself, read by Ceph's own tool
    exported = tmp_path / "exported.img"
    ceph.run("rbd", "export", "--no-progress", rbd_image, str(exported))
    assert exported.read_bytes() == source.read_bytes()


def test_fio_verify_four_connections(ceph: CephCluster, rbd_image: str, tmp_path: Path) -> None:
    with serve(ceph, rbd_image, tmp_path) as srv:
        out = run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={srv.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=4M",
            "--offset_increment=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
            timeout=300,
        )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB


def test_block_status_shows_holes_after_trim_and_zero(
    ceph: CephCluster, rbd_image: str, tmp_path: Path
) -> None:
    nbd = import_nbd()
    with serve(ceph, rbd_image, tmp_path) as srv:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri)
        try:
            assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_multi_conn()
            h.pwrite(b"\x5a" * (16 * MiB), 0)
            h.trim(8 * MiB, 4 * MiB)  # whole 4 MiB objects: librbd removes them
            h.zero(4 * MiB, 4 * MiB)  # the rest of the data, holes allowed
            h.zero(12 * MiB, 4 * MiB)
            h.flush()
            extents: list[tuple[int, int]] = []

            def seen(context: str, offset: int, entries: list[int], err: object) -> int:
                if context == "base:allocation":
                    extents.extend(zip(entries[::2], entries[1::2], strict=True))
                return 0

            h.block_status(32 * MiB, 0, seen)
            assert h.pread(4 * MiB, 0) == b"\x5a" * (4 * MiB)
            assert h.pread(MiB, 10 * MiB) == bytes(MiB)
        finally:
            h.shutdown()
    flags_at: dict[int, int] = {}
    at = 0
    for length, flags in extents:
        for mib in range(at // MiB, (at + length) // MiB):
            flags_at[mib] = flags
        at += length
    assert [flags_at[m] for m in range(4)] == [0] * 4, extents  # data
    assert [flags_at[m] for m in range(4, 32)] == [3] * 28, extents  # hole + zero


def test_snapshot_export_is_read_only_and_frozen(
    ceph: CephCluster, rbd_image: str, tmp_path: Path
) -> None:
    nbd = import_nbd()
    with serve(ceph, rbd_image, tmp_path) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"before" * 1000, 0)
        h.flush()
        ceph.run("rbd", "snap", "create", f"{rbd_image}@s1")
        h.pwrite(b"after!" * 1000, 0)
        h.shutdown()
    with serve(ceph, f"{rbd_image}@s1", tmp_path) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        try:
            assert h.is_read_only()
            assert h.pread(6000, 0) == b"before" * 1000
            h.set_strict_mode(0)  # send the write anyway: the server must refuse it
            with pytest.raises(nbd.Error) as err:
                h.pwrite(b"x" * 512, 0)
            assert err.value.errno == "EPERM"
        finally:
            h.shutdown()


@pytest.mark.parametrize("what", ["pool", "image", "snapshot"])
def test_missing_pool_image_or_snapshot_is_one_line_at_start_up(
    ceph: CephCluster, rbd_image: str, what: str
) -> None:
    pool, name = rbd_image.split("/")
    target = {
        "pool": f"rbd:nopool/{name}",
        "image": f"rbd:{pool}/noimage",
        "snapshot": f"rbd:{pool}/{name}@nosnap",
    }[what]
    done = subprocess.run(
        server_command(
            "--target",
            target,
            "--rbd-conf",
            str(ceph.conf),
            "--lport",
            str(free_port()),
            "--laddr",
            "127.0.0.1",
        ),
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("xnbd-server: ") and f"no {what}" in lines[0], lines[0]


def bgctl(*args: str) -> str:
    return run(sys.executable, "-m", "xnbdd.cli.bgctl", *args)


def test_migrate_a_local_disk_into_ceph_with_cache_all_and_switch(
    ceph: CephCluster, tmp_path: Path
) -> None:
    """A proxy whose cache is an RBD image (created by the proxy) pulls a local target's disk
    into the cluster; after --switch the origin goes away and the cluster serves the disk."""
    origin_image = tmp_path / "origin.img"
    data = os.urandom(12 * MiB) + bytes(8 * MiB) + os.urandom(4 * MiB)
    origin_image.write_bytes(data)
    name = f"m-{uuid.uuid4().hex[:8]}"
    bitmap, ctl = tmp_path / "cache.bm", tmp_path / "cache.ctl"
    try:
        with running_server("--target", str(origin_image), tmp_path=tmp_path) as origin:
            proxy_args = ["--proxy", "127.0.0.1", str(origin.port), f"rbd:{ceph.pool}/{name}"]
            with running_server(
                *proxy_args, str(bitmap), str(ctl), "--rbd-conf", str(ceph.conf), tmp_path=tmp_path
            ) as proxy:
                nbd = import_nbd()
                h = nbd.NBD()
                h.connect_uri(proxy.uri)
                h.pwrite(b"\x77" * 65536, 20 * MiB)  # a client write during the migration
                h.flush()
                model = bytearray(data)
                model[20 * MiB : 20 * MiB + 65536] = b"\x77" * 65536
                bgctl("--cache-all", str(ctl))
                status = json.loads(bgctl("--json", "--query", str(ctl)))
                assert status["cached_blocks"] == status["total_blocks"]
                assert "switched to target mode" in bgctl("--switch", str(ctl))
                origin.stop()
                assert h.pread(4 * MiB, 10 * MiB) == model[10 * MiB : 14 * MiB]
                h.shutdown()
                back = tmp_path / "back.img"
                run("nbdcopy", proxy.uri, str(back))
                assert back.read_bytes() == model
        exported = tmp_path / "exported.img"
        ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{name}", str(exported))
        assert exported.read_bytes() == model  # the disk now lives in the cluster
    finally:
        ceph.remove_image(name)


def test_a_proxy_cache_image_larger_than_the_origin_is_refused(
    ceph: CephCluster, rbd_image: str, tmp_path: Path
) -> None:
    origin_image = tmp_path / "origin.img"
    origin_image.write_bytes(bytes(16 * MiB))  # the cache image is 32 MiB
    with running_server("--target", str(origin_image), tmp_path=tmp_path) as origin:
        done = subprocess.run(
            server_command(
                *("--proxy", "127.0.0.1", str(origin.port), f"rbd:{rbd_image}"),
                *(str(tmp_path / "bm"), str(tmp_path / "ctl"), "--rbd-conf", str(ceph.conf)),
                *("--lport", str(free_port()), "--laddr", "127.0.0.1"),
            ),
            capture_output=True,
            text=True,
            env=server_env(),
            timeout=120,
        )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]  # after the log lines: the reason, one line
    assert last.startswith("xnbd-server: cache rbd:"), done.stderr
    assert "larger than the origin's" in last and "--clear-bitmap" in last
