"""The sparse-aware proxy end to end: the real daemon in front of a sparse origin (nbdkit, our
own target), driven by the real xnbd-bgctl. The bytes the origin sends are counted by a relay
between the two, the data compared with nbdcopy's copy, the block status with nbdinfo --map,
and a kill -9 during a sparse cache-all must leave no wrong block marked cached."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_proxy_e2e import (
    BLOCK,
    ProxyFiles,
    bgctl,
    bitmap_bits,
    connect,
    nbdcopy_to,
    origin_of,
    query,
    sha,
)
from tests.origin_servers import nbdkit, need, sparse_image
from tests.serverproc import running_server, server_env

pytestmark = pytest.mark.e2e

SIZE = 64 << 20
EXTENT = 1 << 20


class CountingRelay:
    """A TCP relay on 127.0.0.1 that forwards every connection to the origin and counts the
    bytes the origin sends back (what a WAN link would carry to the proxy)."""

    def __init__(self, host: str, port: str) -> None:
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = str(self.listener.getsockname()[1])
        self.downstream = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for src, dst, count in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, count), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.downstream += len(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepter.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


@contextlib.contextmanager
def relay(host: str, port: str) -> Iterator[CountingRelay]:
    counting = CountingRelay(host, port)
    try:
        yield counting
    finally:
        counting.close()


def allocation_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) of nbdinfo --map, neighbours of one type merged."""
    out = subprocess.run(
        [need("nbdinfo"), "--map", "--json", uri],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    merged: list[tuple[int, int, int]] = []
    for entry in json.loads(out):
        offset, length, kind = entry["offset"], entry["length"], entry["type"]
        if merged and merged[-1][2] == kind and sum(merged[-1][:2]) == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, kind)
        else:
            merged.append((offset, length, kind))
    return merged


@pytest.mark.parametrize("kind", ["nbdkit", "xnbd-target"])
def test_sparse_cache_all_moves_only_the_data(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=21)
    data_bytes = len(data_at) * EXTENT
    files = ProxyFiles.under(tmp_path)
    with (
        origin_of(kind, tmp_path, image) as origin,
        relay(origin.host, origin.port) as link,
        running_server(*files.args("127.0.0.1", link.port), tmp_path=tmp_path) as proxy,
    ):
        origin_uri = f"nbd://{origin.host}:{origin.port}/"
        assert query(files.ctl)["remote_allocation"] is True
        cached = bgctl("--cache-all", str(files.ctl))
        assert cached.returncode == 0, cached.stderr
        status = query(files.ctl)
        assert status["cached_blocks"] == status["total_blocks"] == SIZE // BLOCK
        assert status["fetched_blocks"] == data_bytes // BLOCK
        assert status["zeroed_blocks"] == (SIZE - data_bytes) // BLOCK
        # the data and a little protocol: nowhere near the 64 MiB of the whole disk
        assert data_bytes <= link.downstream < data_bytes * 1.02 + (256 << 10)
        assert allocation_map(proxy.uri) == allocation_map(origin_uri)
        assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)
    assert bitmap_bits(files.bitmap, SIZE // BLOCK) == [True] * (SIZE // BLOCK)


def test_block_status_through_a_cold_proxy_is_the_origins(tmp_path: Path) -> None:
    """Before anything is cached the proxy passes the origin's allocation on, so nbdcopy
    through it skips the holes: only the data crosses."""
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=22)
    files = ProxyFiles.under(tmp_path)
    with (
        nbdkit(tmp_path, ["file", str(image)]) as origin,
        relay(origin.host, origin.port) as link,
        running_server(*files.args("127.0.0.1", link.port), tmp_path=tmp_path) as proxy,
    ):
        assert allocation_map(proxy.uri) == allocation_map(f"nbd://127.0.0.1:{origin.port}/")
        assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)
        assert link.downstream < len(data_at) * EXTENT * 1.02 + (256 << 10)


def test_kill_9_during_a_sparse_cache_all_then_restart(tmp_path: Path) -> None:
    """The cache starts full of stale bytes, so a bit persisted before its block's zeroing was
    durable would show as garbage. After each kill every block marked cached on disk holds the
    origin's bytes; the restarted proxy finishes and its copy equals the origin."""
    image = tmp_path / "origin.img"
    data, _data_at = sparse_image(image, SIZE, extent=EXTENT, seed=23)
    files = ProxyFiles.under(tmp_path)
    files.cache.write_bytes(b"\xa5" * SIZE)
    nblocks = SIZE // BLOCK
    marked: list[int] = []
    # 20 Mbit/s: the 13 MiB of data take about 5 s, so the kills land mid-copy; noparallel:
    # nbdkit 1.32 aborts when a killed client leaves requests behind
    with nbdkit(
        tmp_path, ["file", str(image), "rate=20M"], filters=("noparallel", "rate")
    ) as origin:
        for round_ in range(3):
            with running_server(
                *files.args(origin.host, origin.port), tmp_path=tmp_path, check_exit=False
            ) as proxy:
                cache_all = subprocess.Popen(
                    [sys.executable, "-m", "xnbdd.cli.bgctl", "--cache-all", str(files.ctl)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=server_env(),
                )
                time.sleep(0.5)
                connect(proxy.uri).flush()  # some bits persisted, more work under way
                time.sleep(0.2 + 0.2 * round_)
                proxy.proc.send_signal(signal.SIGKILL)
                proxy.proc.wait()
                cache_all.wait(30)
            bits = bitmap_bits(files.bitmap, nblocks)
            content = files.cache.read_bytes()
            wrong = [
                b
                for b in range(nblocks)
                if bits[b]
                and content[b * BLOCK : (b + 1) * BLOCK] != data[b * BLOCK : b * BLOCK + BLOCK]
            ]
            assert wrong == [], f"round {round_}: blocks marked cached with wrong data {wrong[:5]}"
            marked.append(sum(bits))
        with running_server(*files.args(origin.host, origin.port), tmp_path=tmp_path) as proxy:
            cached = bgctl("--cache-all", str(files.ctl), timeout=120)
            assert cached.returncode == 0, cached.stderr
            assert sha(nbdcopy_to(proxy.uri, tmp_path / "copy.img")) == sha(data)
    assert 0 < marked[0] < nblocks, marked  # the first kill did land mid-copy
