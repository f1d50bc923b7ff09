"""Proxy mode end to end (issue 5): the real daemon between real NBD clients (nbdcopy, libnbd)
and real origins (our own target, nbdkit, qemu-nbd, nbd-server), driven by the real xnbd-bgctl.

Every figure checked here is observable from outside: bytes the clients read, bits in the bitmap
file, READ requests the origin logged (nbdkit's log filter), the daemon's RSS and exit status."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.libnbd import import_nbd
from tests.origin_servers import nbd_server, nbdkit, need, qemu_nbd, random_image
from tests.serverproc import ServerProcess, free_port, running_server, server_env

pytestmark = pytest.mark.e2e

BLOCK = 4096
SIZE = 8 << 20
SHM = Path("/dev/shm")


# -- helpers shared with test_proxy_crash.py -------------------------------------------------


@dataclass
class ProxyFiles:
    cache: Path
    bitmap: Path
    ctl: Path

    @classmethod
    def under(cls, directory: Path, name: str = "proxy") -> ProxyFiles:
        return cls(directory / f"{name}.cache", directory / f"{name}.bm", directory / f"{name}.ctl")

    def args(self, host: str, port: str) -> list[str]:
        return ["--proxy", host, port, str(self.cache), str(self.bitmap), str(self.ctl)]


def bgctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xnbdd.cli.bgctl", *args],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=timeout,
        check=False,
    )


def query(ctl: Path) -> dict[str, Any]:
    result = bgctl("--json", "--query", str(ctl))
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def nbdcopy_to(uri: str, dest: Path) -> bytes:
    subprocess.run([need("nbdcopy"), uri, str(dest)], check=True, timeout=120)
    return dest.read_bytes()


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def bitmap_bits(path: Path, nblocks: int) -> list[bool]:
    """Decode the original's format: LSB-first bits in 64-bit little-endian words."""
    raw = path.read_bytes()
    assert len(raw) == 8 * -(-nblocks // 64), f"bitmap of {len(raw)} bytes for {nblocks} blocks"
    bits = [bool(raw[i // 8] >> (i % 8) & 1) for i in range(8 * len(raw))]
    assert not any(bits[nblocks:]), "bits past the last block must stay zero"
    return bits[:nblocks]


def blocks_of(offset: int, length: int) -> range:
    return range(offset // BLOCK, -(-(offset + length) // BLOCK))


def fetched_blocks(reads: list[tuple[int, int]]) -> list[int]:
    """Every block the origin was asked for, once per time it was asked."""
    return [b for off, length in reads for b in blocks_of(off, length)]


def connect(uri: str) -> Any:
    nbd = import_nbd()
    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


@contextlib.contextmanager
def own_target(tmp_path: Path, image: Path, *extra: str) -> Iterator[ServerProcess]:
    """Our own xnbd-server --target as the origin (not checking its exit: tests kill it)."""
    with running_server("--target", *extra, str(image), tmp_path=tmp_path, check_exit=False) as s:
        yield s


@dataclass
class Origin:
    host: str
    port: str
    stop: Callable[[], None]


@contextlib.contextmanager
def origin_of(kind: str, tmp_path: Path, image: Path) -> Iterator[Origin]:
    if kind in ("xnbd-target", "xnbd-oldstyle"):
        extra = ("--oldstyle",) if kind == "xnbd-oldstyle" else ()
        with own_target(tmp_path, image, *extra) as server:
            yield Origin("127.0.0.1", str(server.port), lambda: server.proc.kill())
    elif kind in ("nbdkit", "nbdkit-oldstyle", "nbdkit-unix"):
        with nbdkit(
            tmp_path,
            ["file", str(image)],
            oldstyle=kind == "nbdkit-oldstyle",
            unix=kind == "nbdkit-unix",
        ) as kit:
            # a unix socket origin is REMOTE_HOST=/path; REMOTE_PORT is then unused
            yield Origin(kit.host, kit.port or "0", kit.kill)
    elif kind == "qemu-nbd":
        with qemu_nbd(tmp_path, image) as qemu:
            yield Origin(qemu.host, qemu.port, qemu.kill)
    else:
        raise AssertionError(kind)


# -- data path ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["xnbd-target", "xnbd-oldstyle", "nbdkit", "nbdkit-oldstyle", "nbdkit-unix", "qemu-nbd"]
)
def test_nbdcopy_through_the_proxy_equals_the_origin(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE + 1000)  # a partial last block too
    files = ProxyFiles.under(tmp_path)
    with (
        origin_of(kind, tmp_path, image) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        if kind == "qemu-nbd":
            data += bytes(-len(data) % 512)  # qemu-nbd exports whole 512-byte sectors
        copied = nbdcopy_to(proxy.uri, tmp_path / "copy.img")
        assert sha(copied) == sha(data)
        status = query(files.ctl)
        assert status["cached_blocks"] == status["total_blocks"] == -(-len(data) // BLOCK)
        assert status["remote_state"] == "connected"
    # persisted at the latest by the orderly stop
    assert bitmap_bits(files.bitmap, status["total_blocks"]) == [True] * status["total_blocks"]


def test_bitmap_bit_by_bit_after_partial_reads(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    rng = random.Random(5)
    reads = [(rng.randrange(SIZE - 20000), rng.randrange(1, 20000)) for _ in range(40)]
    reads += [(0, 1), (SIZE - 1, 1), (BLOCK - 1, 2)]  # first, last, straddling a boundary
    expected = sorted({b for off, length in reads for b in blocks_of(off, length)})
    with (
        nbdkit(tmp_path, ["file", str(image)], log=True) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        handle = connect(proxy.uri)
        for offset, length in reads:
            assert handle.pread(length, offset) == data[offset : offset + length]
        handle.flush()  # data, then bits, are durable
        bits = bitmap_bits(files.bitmap, SIZE // BLOCK)
        assert [b for b, cached in enumerate(bits) if cached] == expected
        # each cached block was fetched exactly once, and nothing else was fetched
        assert sorted(fetched_blocks(origin.reads())) == expected
        cache = files.cache.read_bytes()
        for b in expected:
            assert cache[b * BLOCK : (b + 1) * BLOCK] == data[b * BLOCK : (b + 1) * BLOCK]
        handle.shutdown()
        # the x-xnbd:cached context says the same as the bitmap
        status = query(files.ctl)
        assert status["cached_blocks"] == len(expected)


def test_writes_stay_in_the_cache_and_fetch_only_head_and_tail(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    with (
        nbdkit(tmp_path, ["file", str(image)], log=True) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        handle = connect(proxy.uri)
        payload = os.urandom(5 * BLOCK)
        offset = 10 * BLOCK + 100  # blocks 10..15: head 10 and tail 15 are partial
        handle.pwrite(payload, offset)
        assert sorted(fetched_blocks(origin.reads())) == [10, 15]
        handle.pwrite(b"\xaa" * BLOCK, 40 * BLOCK)  # a whole block: nothing to fetch
        handle.flush()
        assert sorted(fetched_blocks(origin.reads())) == [10, 15]
        view = bytearray(data)
        view[offset : offset + len(payload)] = payload
        view[40 * BLOCK : 41 * BLOCK] = b"\xaa" * BLOCK
        assert handle.pread(64 * BLOCK, 0) == view[: 64 * BLOCK]
        handle.shutdown()
        assert origin.writes() == 0
        assert image.read_bytes() == data  # the origin never sees a write


def test_two_clients_reading_the_same_cold_blocks_fetch_them_once(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    with (
        nbdkit(
            tmp_path, ["file", str(image), "rdelay=300ms"], filters=("delay",), log=True
        ) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        handles = [connect(proxy.uri) for _ in range(2)]
        start = threading.Barrier(2)
        results: list[bytes] = [b"", b""]

        def read(i: int) -> None:
            start.wait()
            results[i] = handles[i].pread(256 * 1024, 1 << 20)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results[0] == results[1] == data[1 << 20 : (1 << 20) + 256 * 1024]
        fetched = fetched_blocks(origin.reads())
        assert sorted(fetched) == list(blocks_of(1 << 20, 256 * 1024)), "a block fetched twice"
        for h in handles:
            h.shutdown()


def test_target_exportname_reaches_a_named_export(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    with nbd_server(tmp_path, image, name="disk") as origin:
        args = [*files.args(origin.host, origin.port), "--target-exportname", "disk"]
        with running_server(*args, tmp_path=tmp_path) as proxy:
            assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)
            assert "export 'disk'" in query(files.ctl)["remote"]


def test_a_wrong_target_exportname_is_a_clear_start_error(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    with own_target(tmp_path, image, "--exportname", "disk") as origin:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "xnbdd",
                *files.args("127.0.0.1", str(origin.port)),
                "--target-exportname",
                "other",
                "--lport",
                str(free_port()),
                "--laddr",
                "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            env=server_env(),
            timeout=30,
            check=False,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{origin.port}" in result.stderr and "other" in result.stderr


# -- migration ----------------------------------------------------------------------------------


@dataclass
class Worker:
    """A libnbd client that reads (checking every byte against its model of the disk) and
    writes (updating the model) until stopped; any failure or wrong byte is recorded."""

    uri: str
    model: bytearray
    seed: int = 1
    write_share: float = 0.3
    ops: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    longest: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> Worker:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive()

    def _run(self) -> None:
        nbd = import_nbd()
        rng = random.Random(self.seed)
        size = len(self.model)
        handle = connect(self.uri)
        try:
            while not self.stopped.is_set():
                length = rng.choice((BLOCK, 3 * BLOCK + 17, 64 * 1024, 256 * 1024))
                offset = rng.randrange(size - length)
                began = time.monotonic()
                try:
                    if rng.random() < self.write_share:
                        payload = rng.randbytes(length)
                        handle.pwrite(payload, offset)
                        self.model[offset : offset + length] = payload
                    else:
                        got = handle.pread(length, offset)
                        if got != self.model[offset : offset + length]:
                            self.failures.append(f"wrong data at {offset}+{length}")
                except nbd.Error as exc:
                    self.failures.append(f"{exc} at {offset}+{length}")
                self.longest = max(self.longest, time.monotonic() - began)
                self.ops += 1
            handle.flush()
        finally:
            handle.shutdown()


@pytest.fixture
def big_origin(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """256 MiB of random data on /dev/shm."""
    path = SHM / f"xnbdd-e2e-origin-{os.getpid()}-{time.monotonic_ns()}.img"
    data = os.urandom(256 << 20)
    path.write_bytes(data)
    try:
        yield path, data
    finally:
        path.unlink()


def shm_files(name: str) -> ProxyFiles:
    base = SHM / f"xnbdd-e2e-{name}-{os.getpid()}-{time.monotonic_ns()}"
    return ProxyFiles(Path(f"{base}.cache"), Path(f"{base}.bm"), Path(f"{base}.ctl"))


def remove(files: ProxyFiles) -> None:
    for path in (files.cache, files.bitmap, Path(f"{files.bitmap}.xnbdd"), files.ctl):
        path.unlink(missing_ok=True)


def test_migration_end_to_end_with_a_busy_client(
    tmp_path: Path, big_origin: tuple[Path, bytes]
) -> None:
    image, data = big_origin
    files = shm_files("migrate")
    try:
        with (
            own_target(tmp_path, image) as origin,
            running_server(*files.args("127.0.0.1", str(origin.port)), tmp_path=tmp_path) as proxy,
        ):
            worker = Worker(proxy.uri, bytearray(data)).start()
            time.sleep(0.5)
            before = worker.ops
            cached = bgctl("--progress", "--cache-all", str(files.ctl))
            assert cached.returncode == 0, cached.stderr
            during_cache_all = worker.ops - before
            status = query(files.ctl)
            assert status["cached_blocks"] == status["total_blocks"] == (256 << 20) // BLOCK
            before = worker.ops
            switched = bgctl("--switch", str(files.ctl))
            assert switched.returncode == 0, switched.stderr
            assert "switched to target mode" in switched.stdout
            origin.proc.terminate()  # the origin goes away; nobody may notice
            origin.proc.wait(10)
            time.sleep(1.0)
            worker.stop()
            assert worker.ops - before > 10, "the client made no progress across the switch"
            assert during_cache_all > 0, "the client made no progress during cache-all"
            assert worker.failures == []
            after = query(files.ctl)
            assert after["mode"] == "target" and "cache_path" not in after
            text = bgctl("--query", str(files.ctl)).stdout
            assert text.startswith(f"target mode: {files.cache}, disksize {256 << 20}")
            assert "?" not in text and "cached blocks" not in text
            view = nbdcopy_to(proxy.uri, SHM / f"{files.cache.name}.copy")
            try:
                assert sha(view) == sha(worker.model), "client view != origin + its writes"
            finally:
                (SHM / f"{files.cache.name}.copy").unlink()
            assert image.read_bytes() == data
            assert "switched to target mode" in proxy.log()
    finally:
        remove(files)


def test_sigusr2_on_an_incomplete_cache_caches_the_rest_then_switches(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    size = 32 << 20
    data = random_image(image, size)
    files = ProxyFiles.under(tmp_path)
    with (
        nbdkit(tmp_path, ["file", str(image), "rdelay=250ms"], filters=("delay",)) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        worker = Worker(proxy.uri, bytearray(data), write_share=0.0).start()
        proxy.proc.send_signal(signal.SIGUSR2)
        time.sleep(0.3)
        status = query(files.ctl)
        assert status["mode"] == "proxy", "switched with blocks still uncached"
        assert status["cached_blocks"] < status["total_blocks"]
        refused = bgctl("--switch", str(files.ctl))
        assert refused.returncode == 1 and refused.stderr
        deadline = time.monotonic() + 25
        while query(files.ctl)["mode"] != "target":
            assert time.monotonic() < deadline, "SIGUSR2 never switched"
            time.sleep(0.1)
        origin.kill()
        time.sleep(0.3)
        worker.stop()
        assert worker.failures == [] and worker.ops > 0
        assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)
        log = proxy.log()
        assert "caching them, then switching" in log and "switched to target mode" in log


def test_switch_refuses_an_incomplete_cache_and_force_says_what_it_risks(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    with (
        nbdkit(tmp_path, ["file", str(image)]) as origin,
        running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy,
    ):
        handle = connect(proxy.uri)
        assert handle.pread(BLOCK, 0) == data[:BLOCK]
        refused = bgctl("--switch", str(files.ctl))
        assert refused.returncode == 1
        assert f"{SIZE // BLOCK - 1} blocks are not cached" in refused.stderr
        assert query(files.ctl)["mode"] == "proxy"
        forced = bgctl("--force", "--switch", str(files.ctl))
        assert forced.returncode == 0, forced.stderr
        assert "zeros or stale data" in forced.stderr
        assert "by force" in forced.stdout
        origin.kill()
        # the risk, as said: the cached block is the origin's, an uncached one reads as zeros
        assert handle.pread(BLOCK, 0) == data[:BLOCK]
        assert handle.pread(BLOCK, BLOCK) == bytes(BLOCK)
        handle.shutdown()
        assert query(files.ctl)["mode"] == "target"


# -- origin failure -----------------------------------------------------------------------------


def test_origin_killed_mid_read_gives_eio_in_time_then_reconnect(tmp_path: Path) -> None:
    nbd = import_nbd()
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    timeout = 2.0
    with (
        nbdkit(tmp_path, ["file", str(image), "rdelay=1000ms"], filters=("delay",)) as first,
        running_server(
            *files.args(first.host, first.port),
            "--remote-timeout",
            str(timeout),
            tmp_path=tmp_path,
        ) as proxy,
    ):
        handle = connect(proxy.uri)
        outcome: list[object] = []

        def read() -> None:
            began = time.monotonic()
            try:
                outcome.append(handle.pread(BLOCK, 0))
            except nbd.Error as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - began)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.4)  # the read is waiting on the origin's delayed answer
        first.kill()
        reader.join(timeout + 10)
        error, took = outcome
        assert isinstance(error, nbd.Error) and error.errnum == errno.EIO, error
        assert isinstance(took, float) and timeout - 0.1 <= took <= timeout + 1.0, took
        assert query(files.ctl)["remote_state"] in ("reconnecting", "failed")
        with nbdkit(tmp_path, ["file", str(image)]) as second:
            moved = bgctl("--reconnect", str(files.ctl), "127.0.0.1", second.port)
            assert moved.returncode == 0, moved.stderr
            assert f"forwarded to 127.0.0.1:{second.port}" in moved.stdout
            assert query(files.ctl)["remote_state"] == "connected"
            assert handle.pread(BLOCK, 0) == data[:BLOCK]  # the same connection goes on
            handle.shutdown()
            assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)


# -- memory bounds --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_queue_and_buffer_limits_bound_memory_in_proxy_mode(tmp_path: Path) -> None:
    nbd = import_nbd()
    size = 512 << 20
    files = ProxyFiles.under(tmp_path)
    request, count = 8 << 20, 64  # 512 MiB of cold reads asked for at once
    with (
        nbdkit(tmp_path, ["pattern", f"size={size}"]) as origin,
        running_server(
            *files.args(origin.host, origin.port),
            "--max-queue-size",
            "2",
            "--max-buf-size",
            str(4 << 20),
            tmp_path=tmp_path,
        ) as proxy,
    ):
        handle = connect(proxy.uri)
        assert len(handle.pread(BLOCK, 0)) == BLOCK
        baseline = rss_kib(proxy.proc.pid)
        peak = baseline
        buffers = [nbd.Buffer(request) for _ in range(count)]
        cookies = [handle.aio_pread(buf, i * request) for i, buf in enumerate(buffers)]
        pending, rounds = set(cookies), 0
        while pending:
            handle.poll(20)
            pending = {c for c in pending if not handle.aio_command_completed(c)}
            peak = max(peak, rss_kib(proxy.proc.pid))
            rounds += 1
        for i in (0, count // 2, count - 1):
            chunk = buffers[i].to_bytearray()
            expected = b"".join((i * request + 8 * k).to_bytes(8, "big") for k in range(4))
            assert chunk[:32] == expected
        handle.shutdown()
    grew = (peak - baseline) / 1024
    print(f"RSS baseline {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB (+{grew:.0f} MiB)")
    assert rounds > 1
    assert grew < 64, f"RSS grew by {grew:.0f} MiB for 512 MiB of pipelined cold reads"
