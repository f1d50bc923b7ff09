"""Real I/O errors under the target backend: nbdkit's error filter behind nbdfuse gives a file
whose reads fail with EIO while a trigger file exists. The client gets EIO for that request
only, the connection stays usable, and the daemon logs one line with the errno."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def faulty_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    for tool in ("nbdkit", "nbdfuse", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    sock, trigger, mnt = tmp_path / "nbdkit.sock", tmp_path / "trigger", tmp_path / "fuse"
    mnt.mkdir()
    nbdkit = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "-U",
            str(sock),
            "--filter=error",
            "memory",
            "16M",
            "error=EIO",
            "error-rate=1",
            f"error-file={trigger}",
        ],
        stderr=subprocess.DEVNULL,
    )
    fuse = None
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        pidfile = tmp_path / "nbdfuse.pid"
        fuse = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(mnt), f"nbd+unix:///?socket={sock}"]
        )
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline, "nbdfuse did not start"
            time.sleep(0.02)
        yield mnt / "nbd", trigger
    finally:
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            fuse.wait(10)
        nbdkit.terminate()
        nbdkit.wait(10)


def test_read_error_is_eio_for_that_request_only(
    faulty_file: tuple[Path, Path], tmp_path: Path
) -> None:
    nbd = import_nbd()
    image, trigger = faulty_file
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert h.pread(4096, 0) == bytes(4096)
        trigger.touch()
        with pytest.raises(nbd.Error) as failure:
            h.pread(65536, 5 * MiB)  # never read before, so not in the page cache
        assert failure.value.errno == "EIO"
        os.unlink(trigger)
        assert h.pread(65536, 9 * MiB) == bytes(65536)  # same connection, still in step
        h.shutdown()
    log = srv.log()
    failed = [line for line in log.splitlines() if "READ at offset 5242880" in line]
    assert len(failed) == 1 and "[client=" in failed[0] and "errno=5" in failed[0], log
