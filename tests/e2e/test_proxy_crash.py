"""kill -9 of the proxy daemon at random moments while cache-all runs and a client writes; after
each restart every block must hold the origin's data or an acknowledged write (issue 5,
docs/decisions.md D14).

What may legitimately survive a crash, per block: the latest acknowledged version; an older
version written since the last acknowledged FLUSH (unflushed writes are not durable, so the
block may also fall back to what it held before them, the origin's data included); and the
write in flight at the kill. Anything else (zeros where the bitmap says cached, data older than
the last FLUSH) is a failure."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.test_proxy_e2e import BLOCK, ProxyFiles, bitmap_bits, connect, query, sha
from tests.libnbd import import_nbd
from tests.origin_servers import nbdkit, need, random_image
from tests.serverproc import running_server, server_env

pytestmark = pytest.mark.e2e

SIZE = 32 << 20
NBLOCKS = SIZE // BLOCK
ROUNDS = 10
ORIGIN_RATE = "30M"  # bits/s: a full cache-all takes 9 s, longer than all rounds together


@dataclass
class Model:
    """The client's view: ``current`` after every acknowledged write; for blocks written since
    the last acknowledged flush, the versions they held before; the write in flight, if any."""

    current: bytearray
    older: dict[int, list[bytes]] = field(default_factory=dict)
    in_flight: dict[int, bytes] = field(default_factory=dict)

    def block(self, b: int) -> bytes:
        return bytes(self.current[b * BLOCK : (b + 1) * BLOCK])

    def applied(self, offset: int, payload: bytes) -> dict[int, bytes]:
        """The versions of the touched blocks once ``payload`` is written at ``offset``."""
        first, stop = offset // BLOCK, -(-(offset + len(payload)) // BLOCK)
        region = bytearray(self.current[first * BLOCK : stop * BLOCK])
        start = offset - first * BLOCK
        region[start : start + len(payload)] = payload
        return {
            b: bytes(region[(b - first) * BLOCK : (b - first + 1) * BLOCK])
            for b in range(first, stop)
        }

    def acknowledged(self, offset: int, payload: bytes) -> None:
        for b in self.applied(offset, payload):
            self.older.setdefault(b, []).append(self.block(b))
        self.current[offset : offset + len(payload)] = payload

    def allowed(self, b: int) -> list[bytes]:
        return [self.block(b), *self.older.get(b, []), *filter(None, [self.in_flight.get(b)])]


class Writer(threading.Thread):
    """Writes (some unaligned), flushes and reads back until the connection dies."""

    def __init__(self, uri: str, model: Model, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.model, self.rng = uri, model, random.Random(seed)
        self.acked = 0
        self.flushes = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        nbd = import_nbd()
        rng, model = self.rng, self.model
        try:
            handle = connect(self.uri)
        except nbd.Error:
            return  # killed before we got in
        while True:
            choice = rng.random()
            try:
                if choice < 0.7:
                    length = rng.choice((512, BLOCK, 3 * BLOCK + 700, 64 * 1024))
                    offset = rng.randrange(0, SIZE - length, rng.choice((1, 512, BLOCK)))
                    payload = rng.randbytes(length)
                    model.in_flight = model.applied(offset, payload)
                    handle.pwrite(payload, offset)
                    model.acknowledged(offset, payload)
                    model.in_flight = {}
                    self.acked += 1
                elif choice < 0.8:
                    handle.flush()
                    model.older.clear()
                    self.flushes += 1
                else:
                    b = rng.randrange(NBLOCKS - 4)
                    got = handle.pread(4 * BLOCK, b * BLOCK)
                    if got != model.current[b * BLOCK : (b + 4) * BLOCK]:
                        self.wrong.append(f"read of blocks {b}..{b + 3} before any crash")
            except nbd.Error:
                return  # the daemon was killed: what was in flight stays in model.in_flight


def runs(blocks: list[int], limit: int = 256) -> list[tuple[int, int]]:
    """Sorted blocks as (first, stop) runs of at most ``limit`` blocks."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b and out[-1][1] - out[-1][0] < limit:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def verify_and_adopt(uri: str, model: Model, check: list[int]) -> int:
    """Read ``check`` through the restarted proxy; each block must be an allowed version. What
    was read becomes the model's truth (unflushed writes may be gone, and that is allowed)."""
    handle = connect(uri)
    bad = []
    for first, stop in runs(check):
        data = handle.pread((stop - first) * BLOCK, first * BLOCK)
        for b in range(first, stop):
            got = data[(b - first) * BLOCK : (b - first + 1) * BLOCK]
            if got not in model.allowed(b):
                what = "zeros" if got == bytes(BLOCK) else "data never written there"
                bad.append(f"block {b}: {what}")
            model.current[b * BLOCK : (b + 1) * BLOCK] = got
    handle.shutdown()
    model.older.clear()
    model.in_flight = {}
    assert bad == [], bad[:10]
    return len(check)


def test_kill_9_during_cache_all_and_writes_then_restart(tmp_path: Path) -> None:
    need("nbdcopy")
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    image = tmp_path / "origin.img"
    origin_data = random_image(image, SIZE, seed=seed)
    model = Model(bytearray(origin_data))
    files = ProxyFiles.under(tmp_path)
    killed_during_cache_all = acked = flushes = checked = 0
    # noparallel: nbdkit 1.32 aborts (connections.c "sock >= 0") when a client with requests
    # in flight under the rate filter vanishes, which is what every kill -9 here does
    limits = ("noparallel", "rate")
    with nbdkit(tmp_path, ["file", str(image), f"rate={ORIGIN_RATE}"], filters=limits) as origin:
        args = files.args(origin.host, origin.port)
        for round_no in range(ROUNDS):
            with running_server(*args, tmp_path=tmp_path, check_exit=False) as proxy:
                if round_no:
                    # the restart: what the last daemon left on disk, read through the new one
                    on_disk = bitmap_bits(files.bitmap, NBLOCKS)
                    written = set(model.older) | set(model.in_flight)
                    check = sorted({b for b in range(NBLOCKS) if on_disk[b]} | written)
                    checked += verify_and_adopt(proxy.uri, model, check)
                cache_all = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "xnbdd.cli.bgctl",
                        "--blocks-per-request",
                        "8",
                        "--cache-all",
                        str(files.ctl),
                    ],
                    env=server_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                writer = Writer(proxy.uri, model, seed + round_no)
                writer.start()
                time.sleep(rng.uniform(0.1, 0.6))
                proxy.proc.send_signal(signal.SIGKILL)
                proxy.proc.wait(10)
                writer.join(10)
                assert not writer.is_alive()
                assert writer.wrong == []
                cache_all.communicate(timeout=10)
                killed_during_cache_all += cache_all.returncode != 0  # 0: it had finished
                acked += writer.acked
                flushes += writer.flushes
        # the last restart, this time to the end: the cache completes and must equal the model
        with running_server(*args, tmp_path=tmp_path) as proxy:
            on_disk = bitmap_bits(files.bitmap, NBLOCKS)
            written = set(model.older) | set(model.in_flight)
            check = sorted({b for b in range(NBLOCKS) if on_disk[b]} | written)
            checked += verify_and_adopt(proxy.uri, model, check)
            done = subprocess.run(
                [sys.executable, "-m", "xnbdd.cli.bgctl", "--cache-all", str(files.ctl)],
                env=server_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert query(files.ctl)["cached_blocks"] == NBLOCKS
            copy = tmp_path / "copy.img"
            subprocess.run([need("nbdcopy"), proxy.uri, str(copy)], check=True, timeout=60)
            assert sha(copy.read_bytes()) == sha(model.current)
    print(
        f"{ROUNDS} kills ({killed_during_cache_all} with cache-all unfinished), "
        f"{acked} acknowledged writes, {flushes} flushes, {checked} blocks checked"
    )
    assert killed_during_cache_all >= 3, "kills did not land while cache-all ran"
    assert acked > 0 and flushes > 0
    assert image.read_bytes() == origin_data
