"""Target mode end to end, driven by real NBD clients from Debian packages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_nbdinfo_reports_every_capability(tmp_path: Path) -> None:
    need("nbdinfo")
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)
    with running_server(
        "--target",
        str(image),
        "--exportname",
        "disk",
        "--description",
        "test disk",
        tmp_path=tmp_path,
    ) as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri + "disk"))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-size"] == 16 * MiB
    assert export["description"] == "test disk"
    assert export["contexts"] == ["base:allocation"]
    for cap in (
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ):
        assert export[cap] is True, cap
    assert export["is_read_only"] is False
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, 32 * MiB)


def test_nbdinfo_readonly_export(tmp_path: Path) -> None:
    need("nbdinfo")
    image = sparse_image(tmp_path / "disk.img", 4 * MiB)
    with running_server("--target", str(image), "--readonly", tmp_path=tmp_path) as srv:
        (export,) = json.loads(run("nbdinfo", "--json", srv.uri))["exports"]
    assert export["is_read_only"] is True
    for cap in ("can_fua", "can_trim", "can_zero", "can_fast_zero"):
        assert export[cap] is False, cap


def test_nbdinfo_list_shows_the_export(tmp_path: Path) -> None:
    need("nbdinfo")
    image = sparse_image(tmp_path / "disk.img", 4 * MiB)
    with running_server(
        "--target",
        str(image),
        "--exportname",
        "disk",
        "--description",
        "the disk",
        tmp_path=tmp_path,
    ) as srv:
        listing = json.loads(run("nbdinfo", "--list", "--json", srv.uri))
    names = [e["export-name"] for e in listing["exports"]]
    assert names == ["disk"]
    assert listing["exports"][0]["description"] == "the disk"


def test_nbdcopy_round_trip_64_mib(tmp_path: Path) -> None:
    need("nbdcopy")
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(64 * MiB))
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    back = tmp_path / "back.img"
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        run("nbdcopy", str(source), srv.uri)
        run("nbdcopy", srv.uri, str(back))
    assert sha256(back) == sha256(source) == sha256(image)


def test_qemu_img_convert_compare_and_map(tmp_path: Path) -> None:
    need("qemu-img")
    source = sparse_image(tmp_path / "src.img", 32 * MiB)
    with open(source, "r+b") as f:  # data at 1 MiB and 20 MiB, holes elsewhere
        f.seek(1 * MiB)
        f.write(os.urandom(MiB))
        f.seek(20 * MiB)
        f.write(os.urandom(2 * MiB))
    image = sparse_image(tmp_path / "disk.img", 32 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), srv.uri)
        extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri))
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    holes = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert (1 * MiB, MiB) in data and (20 * MiB, 2 * MiB) in data, extents
    assert all(e["zero"] for e in extents if not e["data"])
    assert sum(length for _, length in data) == 3 * MiB, extents
    assert holes, extents


def test_qemu_io_patterns_fua_discard_and_write_zeroes(tmp_path: Path) -> None:
    need("qemu-io")
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        out = run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "write -f -P 0xcd 2M 4k",  # FUA
            "-c",
            "read -P 0xcd 2M 4k",
            "-c",
            "write -P 0x11 3M 128k",
            "-c",
            "write -z 3M 64k",  # WRITE_ZEROES over data
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "read -P 0x11 3136k 64k",
            "-c",
            "discard 1M 64k",
            "-c",
            "aio_write -P 0x22 5M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x22 5M 64k",
            "-c",
            "flush",
            srv.uri,
        )
    assert "Pattern verification failed" not in out
    data = image.read_bytes()
    assert data[2 * MiB : 2 * MiB + 4096] == b"\xcd" * 4096
    assert data[3 * MiB : 3 * MiB + 65536] == bytes(65536)
    assert data[5 * MiB : 5 * MiB + 65536] == b"\x22" * 65536
    discarded = data[1 * MiB : 1 * MiB + 65536]
    assert discarded in (bytes(65536), b"\xab" * 65536)


def test_fio_verify_eight_connections_queue_depth_32(tmp_path: Path) -> None:
    need("fio")
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        out = run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={srv.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=8",
            "--size=8M",
            "--offset_increment=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",  # else fio leaves *-verify.state files in the cwd
            "--group_reporting",
            "--output-format=json",
            timeout=300,
        )
    result = json.loads(out[out.index("{") :])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB
    assert job["read"]["io_bytes"] == 64 * MiB  # the verify pass read everything back


def test_flush_on_one_connection_makes_writes_of_another_visible_to_a_third(
    tmp_path: Path,
) -> None:
    nbd = import_nbd()
    image = sparse_image(tmp_path / "disk.img", 8 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        a, b, c = nbd.NBD(), nbd.NBD(), nbd.NBD()
        for h in (a, b, c):
            h.connect_uri(srv.uri)
        assert a.can_multi_conn()
        for round_ in range(20):
            payload = os.urandom(65536)
            a.pwrite(payload, round_ * 65536)
            b.pwrite(payload[::-1], 4 * MiB + round_ * 65536)
            c.flush()
            assert c.pread(65536, round_ * 65536) == payload
            assert c.pread(65536, 4 * MiB + round_ * 65536) == payload[::-1]
        for h in (a, b, c):
            h.shutdown()


def test_clean_stop_under_load_exits_zero(tmp_path: Path) -> None:
    """SIGTERM while fio writes: in-flight requests finish, the daemon exits 0."""
    need("fio")
    image = sparse_image(tmp_path / "disk.img", 32 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        fio = subprocess.Popen(
            [
                "fio",
                "--name=load",
                "--ioengine=nbd",
                f"--uri={srv.uri}",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=16",
                "--size=32M",
                "--time_based",
                "--runtime=30",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            assert srv.stop() == 0
            fio.wait(60)  # fio notices the disconnect and ends instead of hanging
        finally:
            if fio.poll() is None:
                fio.kill()
    assert "stopping" in srv.log()


def test_large_reads_from_a_memory_file_system_round_trip(tmp_path: Path) -> None:
    """Images on tmpfs answer large reads with sendfile; the bytes must be the image's."""
    need("nbdcopy")
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    image = shm / f"xnbdd-test-{os.getpid()}.img"
    try:
        image.write_bytes(os.urandom(48 * MiB))
        back = tmp_path / "back.img"
        with running_server("--target", str(image), tmp_path=tmp_path) as srv:
            run("nbdcopy", "--request-size=4194304", srv.uri, str(back))
            nbd = import_nbd()
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            for offset in (0, 12345, 47 * MiB):  # unaligned, and up to the end
                assert h.pread(MiB, offset) == image.read_bytes()[offset : offset + MiB]
            h.shutdown()
        assert sha256(back) == sha256(image)
    finally:
        image.unlink(missing_ok=True)
