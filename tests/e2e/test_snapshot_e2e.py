"""SIGUSR1 snapshots end to end: the real daemon, real clients, real file systems."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.backends.loopdev import loop_device, mounted_fs, require_loop
from tests.libnbd import import_nbd
from tests.serverproc import ServerProcess, running_server, server_env
from xnbdd.control.client import ControlClient

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096
SNAPSHOT_LINE = re.compile(r"snapshot (\S+): (\d+) bytes by (\w+) in ([\d.]+) s")


@contextmanager
def serving(*args: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """running_server, returned once the daemon is ready (its port listens before that)."""
    with running_server(*args, tmp_path=tmp_path) as srv:
        wait_for_log(srv, re.compile(r"ready: "))
        yield srv


def wait_for_log(
    srv: ServerProcess, pattern: re.Pattern[str], timeout: float = 30
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        match = pattern.search(srv.log())
        if match is not None:
            return match
        assert srv.proc.poll() is None, f"server exited:\n{srv.log()}"
        assert time.monotonic() < deadline, f"no {pattern.pattern!r} in the log:\n{srv.log()}"
        time.sleep(0.01)


def snapshot(srv: ServerProcess) -> tuple[Path, str]:
    """Send SIGUSR1, wait for the success line; returns the snapshot's path and the method."""
    srv.proc.send_signal(signal.SIGUSR1)
    match = wait_for_log(srv, re.compile(SNAPSHOT_LINE.pattern + "|snapshot failed: .*"))
    assert match.group(1), f"snapshot failed:\n{srv.log()}"
    return Path(match.group(1)), match.group(3)


@contextmanager
def connected(uri: str) -> Iterator[Any]:
    nbd = import_nbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="xnbdd-snap-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_image(path: Path, size: int, data_ranges: list[tuple[int, int]]) -> bytes:
    """A sparse image with random data in ``data_ranges``; returns its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, stop in data_ranges:
            content[start:stop] = os.urandom(stop - start)
            f.seek(start)
            f.write(content[start:stop])
    return bytes(content)


def other_files(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_answered_writes_are_in_the_snapshot_later_ones_are_not(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    write_image(image, 8 * MiB, [(0, MiB)])
    with serving("--target", str(image), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
        h.pwrite(b"before" * 1000, 2 * MiB)
        taken, _ = snapshot(srv)
        h.pwrite(b"after!" * 1000, 2 * MiB)
        h.pwrite(b"after!" * 1000, 3 * MiB)
        assert h.pread(6000, 2 * MiB) == b"after!" * 1000  # the client carried on, no error
        snap = taken.read_bytes()
    assert taken.parent == tmp_path and taken.name.startswith("disk.img.snapshot.")
    assert re.fullmatch(r"disk\.img\.snapshot\.\d{10}", taken.name)
    assert snap[2 * MiB : 2 * MiB + 6000] == b"before" * 1000
    assert snap[3 * MiB : 3 * MiB + 6000] == bytes(6000)
    assert snap[:MiB] == image.read_bytes()[:MiB]
    assert oct(taken.stat().st_mode & 0o777) == oct(0o600)
    assert other_files(tmp_path, {"disk.img", taken.name}) == [f"server-{srv.port}.log"]


class SequencedWriter(threading.Thread):
    """Writes block i with sequence number i + 1, in order, ``depth`` requests in flight."""

    def __init__(self, uri: str, nblocks: int, depth: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.nblocks = nblocks
        self.depth = depth
        self.answered = 0  # every write numbered up to this one was answered
        self.issued = 0  # highest sequence number sent
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.go = threading.Event()  # connected, it writes once this is set
        self.go.set()

    def run(self) -> None:
        nbd = import_nbd()
        pending: dict[int, tuple[int, Any]] = {}  # seq -> (cookie, buffer kept alive)
        try:
            with connected(self.uri) as h:
                self.go.wait()
                while not self.stop.is_set():
                    while len(pending) < self.depth and self.issued < self.nblocks:
                        seq = self.issued + 1
                        data = bytearray(struct.pack("<Q", seq) * (BLOCK // 8))
                        buf = nbd.Buffer.from_bytearray(data)
                        pending[seq] = (h.aio_pwrite(buf, (seq - 1) * BLOCK), buf)
                        self.issued = seq
                    if not pending:
                        return
                    h.poll(-1)
                    for seq, (cookie, _) in list(pending.items()):
                        if h.aio_command_completed(cookie):  # raises if the server said error
                            del pending[seq]
                    self.answered = min(pending) - 1 if pending else self.issued
        except BaseException as e:  # reported by the test, in its own thread
            self.error = e


def sequence_numbers(path: Path, nblocks: int) -> list[int]:
    data = path.read_bytes()
    out = []
    for i in range(nblocks):
        block = data[i * BLOCK : (i + 1) * BLOCK]
        (seq,) = struct.unpack_from("<Q", block)
        assert block == struct.pack("<Q", seq) * (BLOCK // 8), f"block {i} is torn"
        out.append(seq)
    return out


@pytest.mark.parametrize(
    ("mode", "depth", "workers"),
    [
        ("--target", 1, 0),
        ("--target", 16, 0),
        ("--cow-target", 1, 0),
        ("--cow-target", 16, 0),
        ("--target", 16, 2),
        ("--cow-target", 16, 2),
    ],
    ids=[
        "target-one-by-one",
        "target-pipelined",
        "cow-one-by-one",
        "cow-pipelined",
        "workers",
        "cow-workers",
    ],
)
def test_continuous_writer_sees_no_error_and_the_snapshot_is_a_request_boundary(
    shm_dir: Path, mode: str, depth: int, workers: int
) -> None:
    """With ``workers`` a second connection starts the daemon's worker processes and the writer
    moves to one; the snapshot recalls it first (xnbdd/workers.py), and ``xnbd-bgctl --query``
    shows which worker serves which client."""
    nblocks = 16384
    image = shm_dir / "disk.img"
    write_image(image, nblocks * BLOCK, [])
    control = shm_dir / "ctl"
    extra: tuple[str, ...] = ("--workers", str(workers), "--control-socket", str(control))
    if workers:  # a copy slow enough for a write to come after the point, before the copier
        extra += ("--snapshot-rate", "32M")
    with serving(mode, str(image), *extra, tmp_path=shm_dir) as srv, ExitStack() as stack:
        writer = SequencedWriter(srv.uri, nblocks, depth)
        if workers:
            writer.go.clear()
        writer.start()
        if workers:
            late = stack.enter_context(connected(srv.uri))  # a second one: workers start
            served = wait_for_workers(control, connections=2)
            assert len(served) == 2, "each connection in its own worker (least loaded)"
            out = bgctl("--query", str(control)).communicate(timeout=60)[0]
            assert all(f"worker process {pid}" in out for pid in served), out
            writer.go.set()
        deadline = time.monotonic() + 30
        while writer.answered < 300 and writer.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        answered_before = writer.answered
        if workers:
            # a write after the point to a block the copier has not reached: not in the copy
            srv.proc.send_signal(signal.SIGUSR1)
            wait_for_log(srv, re.compile("snapshot point taken"))
            late.pwrite(struct.pack("<Q", 10**9) * (BLOCK // 8), (nblocks - 1) * BLOCK)
            taken = Path(wait_for_log(srv, SNAPSHOT_LINE).group(1))
            # handed out again after the snapshot (the writer may have written every block)
            wait_for_workers(control, connections=1, late=True)
        else:
            taken, _ = snapshot(srv)
        issued_after = writer.issued + 1  # sent after the copy was done
        while writer.answered < issued_after + 100 and writer.is_alive():
            time.sleep(0.005)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error
        seqs = sequence_numbers(taken, nblocks)
    k = sum(1 for s in seqs if s)
    # every block holds its own number or zeros, and exactly the first k writes are present
    assert seqs == [i + 1 for i in range(k)] + [0] * (nblocks - k)
    assert answered_before <= k < issued_after, (answered_before, k, issued_after)
    # writing went on after the snapshot (with workers the writer may have finished)
    assert writer.answered > issued_after or writer.answered == nblocks


REFLINK_FS_SIZE = {"xfs": 320 * MiB, "btrfs": 256 * MiB}


@pytest.mark.parametrize("mode", ["--target", "--cow-target"])
@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_reflink_path_on_a_reflink_file_system(tmp_path: Path, fstype: str, mode: str) -> None:
    with mounted_fs(tmp_path, fstype, REFLINK_FS_SIZE[fstype]) as mnt:
        image = mnt / "disk.img"
        content = bytearray(write_image(image, 16 * MiB, [(0, 4 * MiB), (8 * MiB, 9 * MiB)]))
        with serving(mode, str(image), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
            h.pwrite(b"R" * 10000, 5 * MiB + 7)
            content[5 * MiB + 7 : 5 * MiB + 10007] = b"R" * 10000
            h.zero(64 * KiB, 0)
            content[: 64 * KiB] = bytes(64 * KiB)
            taken, method = snapshot(srv)
            assert method == "reflink"
            assert taken.read_bytes() == content
            assert taken.parent == mnt
        if mode == "--cow-target":
            assert other_files(mnt, {"disk.img", taken.name}) == []  # the overlay is gone


@contextmanager
def copy_fs(kind: str, tmp_path: Path) -> Iterator[Path]:
    if kind == "tmpfs":
        path = Path(tempfile.mkdtemp(prefix="xnbdd-snap-", dir="/dev/shm"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        with mounted_fs(tmp_path, "ext4", 64 * MiB) as mnt:
            yield mnt


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_copy_path_keeps_content_and_holes(tmp_path: Path, kind: str) -> None:
    with copy_fs(kind, tmp_path) as directory:
        image = directory / "disk.img"
        content = bytearray(write_image(image, 16 * MiB, [(MiB, 3 * MiB)]))
        with serving("--target", str(image), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
            h.pwrite(b"C" * 4096, 12 * MiB)
            content[12 * MiB : 12 * MiB + 4096] = b"C" * 4096
            taken, method = snapshot(srv)
        assert method == "copy"
        assert taken.read_bytes() == content
        assert taken.stat().st_blocks * 512 < 4 * MiB  # holes kept: about 2 MiB of data
        assert other_files(directory, {"disk.img", taken.name, "lost+found"}) == []


def test_full_disk_leaves_no_temporary_file_and_a_serving_daemon(tmp_path: Path) -> None:
    with mounted_fs(tmp_path, "ext4", 32 * MiB) as mnt:
        image = mnt / "disk.img"
        content = bytearray(write_image(image, 20 * MiB, [(0, 20 * MiB)]))
        with serving("--target", str(image), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
            h.pwrite(b"D" * 4096, 0)
            content[:4096] = b"D" * 4096
            srv.proc.send_signal(signal.SIGUSR1)
            line = wait_for_log(srv, re.compile(r"snapshot failed: .*"))
            assert "No space left on device" in line.group(0)
            assert other_files(mnt, {"disk.img", "lost+found"}) == []
            # the same connection, and a new one, keep working
            h.pwrite(b"E" * 4096, 4096)
            content[4096:8192] = b"E" * 4096
            with connected(srv.uri) as h2:
                assert h2.pread(20 * MiB, 0) == content
            assert SNAPSHOT_LINE.search(srv.log()) is None


def test_a_second_snapshot_while_one_runs_is_refused(shm_dir: Path) -> None:
    # a background copy that takes about two seconds: 64 MiB of data at 32 MiB/s
    image = shm_dir / "big.img"
    write_image(image, 64 * MiB, [(0, 64 * MiB)])
    with serving("--target", str(image), "--snapshot-rate", "32M", tmp_path=shm_dir) as srv:
        srv.proc.send_signal(signal.SIGUSR1)
        wait_for_log(srv, re.compile(r"snapshot point taken"))
        srv.proc.send_signal(signal.SIGUSR1)
        refused = wait_for_log(srv, re.compile(r"snapshot failed: .*"))
        assert "refused: a snapshot is in progress" in refused.group(0)
        assert f"{image}.snapshot." in refused.group(0)  # it names the one running
        taken = Path(wait_for_log(srv, SNAPSHOT_LINE, timeout=60).group(1))
        log = srv.log()
        assert log.index("in progress") < log.index(f"snapshot {taken}:")
        assert taken.read_bytes() == image.read_bytes()  # nothing wrote meanwhile
        assert other_files(shm_dir, {"big.img", taken.name, f"server-{srv.port}.log"}) == []


def need_nbdcopy() -> None:
    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy is not installed")


def test_cow_target_snapshot_is_base_plus_overlay(tmp_path: Path) -> None:
    need_nbdcopy()
    base = tmp_path / "base.img"
    before = write_image(base, 8 * MiB, [(0, 2 * MiB), (4 * MiB, 6 * MiB)])
    nbd = import_nbd()
    with serving("--cow-target", str(base), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
        h.pwrite(b"O" * 5000, MiB - 100)  # unaligned over base data
        h.pwrite(b"P" * 8192, 3 * MiB)  # over a base hole
        h.trim(64 * KiB, 4 * MiB)  # base data trimmed away
        h.zero(8192, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)
        taken, method = snapshot(srv)
        seen = tmp_path / "seen.img"
        subprocess.run(["nbdcopy", srv.uri, str(seen)], check=True, timeout=60)
    assert method == "copy"  # ext4
    assert taken.name.startswith("base.img.snapshot.")
    assert taken.read_bytes() == seen.read_bytes()
    assert seen.read_bytes() != before
    assert base.read_bytes() == before


def test_snapshot_of_a_block_device_target(tmp_path: Path) -> None:
    require_loop()
    with loop_device(tmp_path / "backing.img", 16 * MiB) as device:
        with open(device, "r+b") as dev:
            dev.write(os.urandom(2 * MiB))
        link = tmp_path / "disk"  # the snapshot goes beside the path given, not into /dev
        link.symlink_to(device)
        with serving("--target", str(link), tmp_path=tmp_path) as srv, connected(srv.uri) as h:
            h.pwrite(b"B" * 4096, 8 * MiB)
            taken, method = snapshot(srv)
            assert method == "copy"
            with open(device, "rb") as dev:
                assert taken.read_bytes() == dev.read()
        assert taken.parent == tmp_path and taken.stat().st_size == 16 * MiB


def test_read_only_directory_fails_clearly_and_the_daemon_serves_on(tmp_path: Path) -> None:
    with mounted_fs(tmp_path, "ext4", 32 * MiB) as mnt:
        image = mnt / "disk.img"
        content = write_image(image, 4 * MiB, [(0, MiB)])
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with (
            serving("--target", "--readonly", str(image), tmp_path=tmp_path) as srv,
            connected(srv.uri) as h,
        ):
            srv.proc.send_signal(signal.SIGUSR1)
            line = wait_for_log(srv, re.compile(r"snapshot failed: .*"))
            assert "Read-only file system" in line.group(0)
            assert h.pread(4 * MiB, 0) == content
        assert other_files(mnt, {"disk.img", "lost+found"}) == []


# -- background copies (no reflink): clients go on while the copy runs --------------------------


def query(control: Path) -> dict[str, Any]:
    with ControlClient(str(control)) as client:
        return client.call("query")


def wait_for_workers(
    control: Path, connections: int, timeout: float = 60, *, late: bool = False
) -> set[int]:
    """The worker PIDs serving ``connections`` connections (``late``: at least that many),
    once every one is in a worker."""
    deadline = time.monotonic() + timeout
    while True:
        status = query(control)
        pids = [c.get("worker") for c in status["connections"]]
        enough = len(pids) >= connections if late else len(pids) == connections
        if enough and all(pids):
            assert set(pids) <= set(status["workers"])
            return {int(p) for p in pids}
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def bgctl(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xnbdd.cli.bgctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(),
    )


def wait_for_copy(control: Path, timeout: float = 30) -> dict[str, Any]:
    """The query once a background copy is under way (its point is taken)."""
    deadline = time.monotonic() + timeout
    while True:
        status = query(control)
        if status.get("snapshot", {}).get("method") == "copy":
            return status
        assert time.monotonic() < deadline, f"no background copy: {status}"
        time.sleep(0.01)


class RandomClient(threading.Thread):
    """One request at a time, 4 KiB reads and writes at random blocks; checks every read
    against ``expected`` (what it wrote there, or the image's first content) and records each
    request's latency. ``hold`` parks it between requests (``idle`` says it is parked)."""

    def __init__(self, uri: str, expected: bytearray) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.expected = expected
        self.ops = 0
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.hold = threading.Event()
        self.idle = threading.Event()

    def run(self) -> None:
        rng = random.Random(14)
        nblocks = len(self.expected) // BLOCK
        try:
            with connected(self.uri) as h:
                while not self.stop.is_set():
                    if self.hold.is_set():
                        self.idle.set()
                        while self.hold.is_set() and not self.stop.is_set():
                            time.sleep(0.001)
                        self.idle.clear()
                    offset = rng.randrange(nblocks) * BLOCK
                    began = time.perf_counter()
                    if self.ops % 2:
                        data = rng.randbytes(BLOCK)
                        h.pwrite(data, offset)
                        self.expected[offset : offset + BLOCK] = data
                    else:
                        got = h.pread(BLOCK, offset)
                        assert got == self.expected[offset : offset + BLOCK], offset
                    self.latencies.append(time.perf_counter() - began)
                    self.ops += 1
        except BaseException as e:  # reported by the test, in its own thread
            self.error = e


def test_clients_are_served_while_a_snapshot_copies_in_the_background(shm_dir: Path) -> None:
    """256 MiB on tmpfs (no reflink), the copy slowed to about 4 s: a client's 4 KiB reads and
    writes go on while the control socket reports the copy running; the snapshot is the image
    at the point, the image has every write; xnbd-bgctl --snapshot prints the path."""
    size = 256 * MiB
    image = shm_dir / "disk.img"
    chunk = os.urandom(MiB)
    with open(image, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
    expected = bytearray(chunk * (size // MiB))
    control = shm_dir / "ctl"
    args = ("--target", str(image), "--control-socket", str(control), "--snapshot-rate", "64M")
    with serving(*args, tmp_path=shm_dir) as srv:
        client = RandomClient(srv.uri, expected)
        client.start()
        while client.ops < 50 and client.is_alive():
            time.sleep(0.005)
        client.hold.set()  # the point falls between two requests: the test knows the image there
        assert client.idle.wait(30), client.error
        at_point = bytes(expected)
        began = time.monotonic()
        taking = bgctl("--snapshot", str(control))
        status = wait_for_copy(control)
        client.hold.clear()
        second = bgctl("--snapshot", str(control))
        refused = second.communicate(timeout=60)
        # (requests done, bytes copied) for each look at the control socket during the copy
        seen: list[tuple[int, int]] = []
        while (job := status.get("snapshot")) is not None:
            seen.append((client.ops, int(job["copied"])))
            assert job["total"] == size and job["partial"].endswith(".partial")
            assert "% copied in the background" in status["operation"]
            time.sleep(0.05)
            status = query(control)
        out, err = taking.communicate(timeout=60)
        copy_seconds = time.monotonic() - began
        client.stop.set()
        client.join(30)
        assert client.error is None, client.error
        assert "snapshot point taken" in srv.log()
    assert taking.returncode == 0, err
    path = Path(out.strip())
    assert out == f"{path}\n" and path.name.startswith("disk.img.snapshot.")
    assert second.returncode == 1 and "refused: a snapshot is in progress" in refused[1]
    during = [ops for ops, copied in seen if copied < size]
    assert during[-1] - during[0] >= 20, seen  # served while the copy was still running
    assert path.read_bytes() == at_point
    assert image.read_bytes() == expected != at_point
    assert other_files(shm_dir, {"disk.img", path.name, "ctl", f"server-{srv.port}.log"}) == []
    worst = max(client.latencies)
    print(f"{client.ops} requests, worst {worst * 1e3:.1f} ms, copy {copy_seconds:.2f} s")
    assert worst < copy_seconds / 4  # far below the copy: nobody waited for it


def test_a_crash_during_the_copy_leaves_the_image_whole_and_the_partial_file_removed(
    shm_dir: Path,
) -> None:
    size = 64 * MiB
    image = shm_dir / "disk.img"
    expected = bytearray(write_image(image, size, [(0, size // 2)]))
    control = shm_dir / "ctl"
    args = ("--target", str(image), "--control-socket", str(control), "--snapshot-rate", "8M")
    with running_server(*args, tmp_path=shm_dir, check_exit=False) as srv:
        taking = bgctl("--snapshot", str(control))
        partial = Path(wait_for_copy(control)["snapshot"]["partial"])
        with connected(srv.uri) as h:
            for offset in (size - BLOCK, 40 * MiB, 3 * MiB):
                data = os.urandom(BLOCK)
                h.pwrite(data, offset)
                expected[offset : offset + BLOCK] = data
            assert query(control)["snapshot"]["copied"] < size  # still copying
        assert partial.exists()
        srv.proc.kill()
        srv.proc.wait(30)
        _, err = taking.communicate(timeout=60)
    assert taking.returncode == 2, err  # the control connection broke
    assert partial.exists() and not Path(str(partial)[: -len(".partial")]).exists()
    assert image.read_bytes() == expected
    with serving("--target", str(image), tmp_path=shm_dir) as srv2, connected(srv2.uri) as h:
        assert f"removed the unfinished snapshot {partial}" in srv2.log()
        assert h.pread(size, 0) == expected
    assert not partial.exists()
    assert other_files(shm_dir, {"disk.img", "ctl"}) == sorted(  # ctl: left by the kill
        [f"server-{srv.port}.log", f"server-{srv2.port}.log"]
    )
