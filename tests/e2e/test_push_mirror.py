"""qemu pushes a disk into `xnbd-server --target` with blockdev-mirror (docs/push-migration.md).

qemu-storage-daemon from the Debian 13 tree (qemu 10, a long-running nspawn container on the
host's network) holds the source image as node `src` and exports that node on a unix socket,
so a writer (the host's python3-libnbd) changes the disk through the very node being mirrored,
as a running VM would. The destination is an `nbd` node on the server under test. The mirror
runs rate-limited so the writer's first writes land while it is still copying; then it runs at
full speed to BLOCK_JOB_READY, the writer writes again, and block-job-complete pivots. The
destination image must then equal the source byte for byte.

qemu's own trace (`--trace nbd_*`) shows what the server offered and what the mirror sent: the
holes of the source arrive as WRITE_ZEROES (the destination starts full of junk, so they are
really written) and never as data.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.qmp import Qmp
from tests.e2e.trixie import nspawn_command
from tests.serverproc import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.nspawn]

MiB = 1 << 20
SIZE = 64 * MiB
DATA = [(0, 32 * MiB), (48 * MiB, 8 * MiB)]  # random bytes; the rest of the source is a hole
SLOW = 8 * MiB  # bytes/s while the first writes land: 40 MiB of data take >= 5 s
WRITE = 64 << 10
# While the mirror copies: a region it has copied, holes behind and ahead of it, data ahead.
WRITES_DURING = [0, 1 * MiB + 4096, 36 * MiB, 50 * MiB, 60 * MiB]
WRITES_READY = [2 * MiB, 40 * MiB, 63 * MiB]  # after BLOCK_JOB_READY, before the pivot
BLOCK = 64 << 10  # the unit of the trace bookkeeping below

# Transmission flags (NBD protocol): what a mirror's target wants offered.
SEND_TRIM, SEND_WRITE_ZEROES, SEND_FAST_ZERO = 1 << 5, 1 << 6, 1 << 11
CMD_WRITE, CMD_WRITE_ZEROES = 1, 6


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def storage_daemon(tree: Path, work: Path, source: Path) -> Iterator[tuple[Qmp, Path]]:
    """qemu-storage-daemon with `source` as node "src", exported writable on a unix socket;
    yields its QMP connection and that socket. Its trace goes to work/trace.log."""
    export = work / "src.sock"
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=src-file,filename={source}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--nbd-server", f"addr.type=unix,addr.path={export}",
        "--export", "type=nbd,id=src-export,node-name=src,name=src,writable=on",
        "--chardev", f"socket,id=qmp,path={work}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=qmp",
        "--trace", f"enable=nbd_*,file={work}/trace.log",
    ]  # fmt: skip
    with open(work / "qsd.log", "wb") as log:
        proc = subprocess.Popen(
            nspawn_command(tree, argv, writable=[work]),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    qmp = None
    try:
        qmp = Qmp(work / "qmp.sock", timeout=60)
        yield qmp, export
        qmp.execute("quit")
        assert proc.wait(60) == 0, (work / "qsd.log").read_text(errors="replace")
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Request:
    line: int  # position in the trace
    kind: int
    offset: int
    length: int
    flags: int

    def covers(self, offset: int, length: int) -> bool:
        return self.offset <= offset and offset + length <= self.offset + self.length


def trace_requests(trace: str) -> tuple[list[Request], list[Request]]:
    """What qemu's NBD client sent to the server under test, and the writes the writer sent to
    qemu's export of the source, in trace order."""
    sent = re.compile(
        r"nbd_send_request .*\.from = (\d+), \.len = (\d+), .*\.flags = 0x([0-9a-f]+), "
        r"\.type = (\d+) "
    )
    received = re.compile(
        r"nbd_receive_request Got request: .*\.flags = 0x([0-9a-f]+), \.type = 0x1, "
        r"from = (\d+), len = (\d+)"
    )
    to_target, from_writer = [], []
    for i, line in enumerate(trace.splitlines()):
        if m := sent.search(line):
            to_target.append(Request(i, int(m[4]), int(m[1]), int(m[2]), int(m[3], 16)))
        elif m := received.search(line):
            from_writer.append(Request(i, CMD_WRITE, int(m[2]), int(m[3]), int(m[1], 16)))
    return to_target, from_writer


def blocks(offset: int, length: int) -> set[int]:
    return set(range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK))


def job(qmp: Qmp) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = qmp.execute("query-block-jobs")
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_qemu_mirrors_a_live_disk_into_the_target(
    trixie_tree: Path, tmp_path: Path, copy_mode: str
) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd (the writer) is not installed")
    source = tmp_path / "source.img"
    with open(source, "wb") as f:
        for offset, length in DATA:
            f.seek(offset)
            f.write(os.urandom(length))
        f.truncate(SIZE)
    destination = tmp_path / "destination.img"
    destination.write_bytes(b"\xaa" * SIZE)  # junk: the holes must really be zeroed
    written: dict[int, bytes] = {}

    with (
        running_server("--target", str(destination), tmp_path=tmp_path) as server,
        storage_daemon(trixie_tree, tmp_path, source) as (qmp, export),
    ):
        # The target node as docs/push-migration.md adds it: discard=unmap lets the zeroes
        # qemu sends punch holes instead of writing them.
        qmp.execute(
            "blockdev-add",
            driver="nbd",
            **{"node-name": "dst"},
            server={"type": "inet", "host": "127.0.0.1", "port": str(server.port)},
            export="",
            discard="unmap",
        )
        started = time.monotonic()
        qmp.execute(
            "blockdev-mirror",
            **{"job-id": "push", "copy-mode": copy_mode},
            device="src",
            target="dst",
            sync="full",
            speed=SLOW,
        )
        writer = nbd.NBD()
        writer.connect_uri(f"nbd+unix:///src?socket={export}")
        while job(qmp)["offset"] < 8 * MiB:
            time.sleep(0.05)
        for offset in WRITES_DURING:
            written[offset] = os.urandom(WRITE)
            writer.pwrite(written[offset], offset)
        state = job(qmp)
        assert state["status"] == "running" and not state["ready"], state  # still copying

        qmp.execute("block-job-set-speed", device="push", speed=0)
        ready = qmp.wait_event("BLOCK_JOB_READY")
        assert ready["data"]["device"] == "push", ready
        for offset in WRITES_READY:
            written[offset] = os.urandom(WRITE)
            writer.pwrite(written[offset], offset)
        writer.flush()
        writer.shutdown()
        del writer

        qmp.execute("block-job-complete", device="push")
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in done["data"], done
        seconds = time.monotonic() - started
        assert qmp.execute("query-block-jobs") == []  # dismissed after the pivot

    # The writer's bytes are in the source, and the destination is the source.
    with open(source, "rb") as f:
        for offset, data in written.items():
            f.seek(offset)
            assert f.read(len(data)) == data, f"write at {offset} is not in the source"
    assert sha256(destination) == sha256(source)
    # Zero writes with discard=unmap punched the holes: the copy is as sparse as the source.
    assert os.stat(destination).st_blocks <= os.stat(source).st_blocks + (2 * MiB) // 512

    trace = (tmp_path / "trace.log").read_text(errors="replace")
    offered = re.search(
        r"nbd_receive_negotiate_size_flags Size is (\d+), export flags 0x(\w+)", trace
    )
    assert offered and int(offered[1]) == SIZE, trace[:3000]
    flags = int(offered[2], 16)
    wanted = {"TRIM": SEND_TRIM, "WRITE_ZEROES": SEND_WRITE_ZEROES, "FAST_ZERO": SEND_FAST_ZERO}
    for name, bit in wanted.items():
        assert flags & bit, f"the server does not offer {name} (flags {flags:#x})"
    assert "set meta context mapping of base:allocation" in trace  # block status for clients

    requests, guest_writes = trace_requests(trace)
    assert sorted(w.offset for w in guest_writes) == sorted(written)
    data_writes = [r for r in requests if r.kind == CMD_WRITE]
    # Every guest write reached the target after it happened; at least one of them dirtied a
    # region the mirror had copied already, so the mirror copied that region again.
    recopied = 0
    for w in guest_writes:
        after = [r for r in data_writes if r.line > w.line and r.covers(w.offset, w.length)]
        assert after, f"the guest write at {w.offset} never reached the target"
        recopied += any(r.line < w.line and r.covers(w.offset, w.length) for r in data_writes)
    assert recopied, "no guest write landed in a region the mirror had already copied"

    data_blocks = set().union(*(blocks(o, n) for o, n in DATA))
    # A guest write may make the mirror copy the whole chunk around it (up to 1 MiB).
    touched = set().union(*(blocks(o // MiB * MiB, 2 * MiB) for o in written))
    holes = set(range(SIZE // BLOCK)) - data_blocks - touched
    sent_as_data = set().union(*(blocks(r.offset, r.length) for r in data_writes))
    zeroed = set().union(
        *(blocks(r.offset, r.length) for r in requests if r.kind == CMD_WRITE_ZEROES)
    )
    assert not sent_as_data & holes, "hole blocks went over the wire as data"
    assert holes <= zeroed, "hole blocks were never zeroed"
    assert data_blocks <= sent_as_data
    print(
        f"{copy_mode}: {seconds:.1f} s; {sum(r.kind == CMD_WRITE for r in requests)} writes "
        f"({sum(r.length for r in requests if r.kind == CMD_WRITE) // MiB} MiB), "
        f"{sum(r.kind == CMD_WRITE_ZEROES for r in requests)} write-zeroes "
        f"({sum(r.length for r in requests if r.kind == CMD_WRITE_ZEROES) // MiB} MiB), "
        f"flags {flags:#x}"
    )


def test_drive_mirror_to_an_nbd_uri_then_cancel_hands_over_a_consistent_copy(
    trixie_tree: Path, tmp_path: Path
) -> None:
    """The older command with the target as a URI, and the hand-over ending of
    docs/push-migration.md: a ready mirror cancelled after the last write leaves the
    destination equal to the source, which stays the disk in use."""
    nbd = pytest.importorskip("nbd", reason="python3-libnbd (the writer) is not installed")
    source = tmp_path / "source.img"
    with open(source, "wb") as f:
        f.write(os.urandom(16 * MiB))
        f.truncate(32 * MiB)
    destination = tmp_path / "destination.img"
    destination.write_bytes(b"\xaa" * (32 * MiB))
    with (
        running_server(
            "--target", str(destination), "--exportname", "vm7", tmp_path=tmp_path
        ) as server,
        storage_daemon(trixie_tree, tmp_path, source) as (qmp, export),
    ):
        qmp.execute(
            "drive-mirror",
            **{"job-id": "push"},
            device="src",
            target=f"nbd://127.0.0.1:{server.port}/vm7",
            format="raw",
            mode="existing",
            sync="full",
        )
        qmp.wait_event("BLOCK_JOB_READY")
        writer = nbd.NBD()
        writer.connect_uri(f"nbd+unix:///src?socket={export}")
        for offset in (0, 20 * MiB, 32 * MiB - WRITE):
            writer.pwrite(os.urandom(WRITE), offset)
        writer.flush()
        qmp.execute("block-job-cancel", device="push")
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in done["data"], done
        assert sha256(destination) == sha256(source)  # both are on disk: qemu writes through
        # Cancelled, not pivoted: the source is still the disk in use, the copy stays as it was.
        copy = sha256(destination)
        late = os.urandom(WRITE)
        writer.pwrite(late, 4 * MiB)
        writer.flush()
        writer.shutdown()
        del writer
    with open(source, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(WRITE) == late
    assert sha256(destination) == copy
