"""Found by the fuzzer (issue 15): clients that pipeline a flood of 1 MiB READs and close at once
made the daemon's memory grow without bound (1.1 to 1.3 GiB after 150 such clients with -B 64M): a
finished connection gave its budget back but kept the replies it never sent until its object
went away, which under load was long after. The bytes now go with the budget."""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

import pytest

from tests import rawnbd
from tests.e2e.test_proxy_e2e import rss_kib
from tests.e2e.test_snapshot_e2e import wait_for_workers
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

MIB = 1 << 20
CLIENTS = 200
READS = 1000
BOUND_MIB = 640  # -B 64M, the interpreter, and what the allocator keeps (~200-350)


def test_flood_then_close_clients_do_not_grow_memory(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (8 * MIB))
    flood = b"".join(
        struct.pack("!IHHQQI", rawnbd.REQUEST_MAGIC, 0, rawnbd.CMD_READ, c, (c % 7) * MIB, MIB)
        for c in range(READS)
    )
    with running_server("--target", "-B", "64M", str(image), tmp_path=tmp_path) as server:
        for _ in range(CLIENTS):
            client = rawnbd.RawClient(server.port)
            client.go()
            client.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.sock.send(flood)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset: every reply still queued is for nobody
        probe = rawnbd.RawClient(server.port)  # still serving, and the floods are over
        probe.go()
        probe.request(rawnbd.CMD_READ, 0, 4096)
        assert probe.simple_reply(4096)[2] == b"\x5a" * 4096
        probe.close()
        # the daemon and its data-plane worker processes (xnbdd/workers.py) together
        rss_mib = sum(rss_kib(pid) for pid in process_tree(server.proc.pid)) // 1024
        assert rss_mib < BOUND_MIB, f"RSS {rss_mib} MiB after {CLIENTS} flooding clients"


def process_tree(pid: int) -> list[int]:
    """The daemon and its children (data-plane worker processes)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return [pid, *kids]


def arena_heaps(pid: int) -> int:
    """glibc's heaps of thread arenas: anonymous read-write mappings on a 64 MiB boundary (the
    main arena grows with brk and is not among them)."""
    count = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start = int(fields[0].split("-")[0], 16)
        if len(fields) == 5 and fields[1] == "rw-p" and start % (64 * MIB) == 0:
            count += 1
    return count


def test_connection_threads_share_two_malloc_arenas(tmp_path: Path) -> None:
    """Found by the fuzzer's RSS bound: each connection thread got a glibc arena of its own,
    and the freed memory kept in each made a proxy with -B 64M grow to 700 MiB (160 MiB with
    two arenas; xnbdd/allocator.py). 24 busy connections at once must not make 16 arenas, in
    the daemon nor in its worker processes (where they are served once the workers run)."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (8 * MIB))
    control = tmp_path / "ctl"
    args = ("--target", str(image), "--workers", "2", "--control-socket", str(control))
    with running_server(*args, tmp_path=tmp_path) as server:
        clients = [rawnbd.RawClient(server.port) for _ in range(24)]
        for client in clients:
            client.go()
        wait_for_workers(control, connections=24)
        batch = b"".join(
            struct.pack("!IHHQQI", rawnbd.REQUEST_MAGIC, 0, rawnbd.CMD_READ, c, 0, 256 * 1024)
            for c in range(8)
        )
        for client in clients:
            client.send(batch)
        for client in clients:
            for _ in range(8):
                assert client.simple_reply(256 * 1024)[0] == 0
        heaps = max(arena_heaps(pid) for pid in process_tree(server.proc.pid))
        for client in clients:
            client.close()
    # One thread arena (the other is the main one) may span two heaps, and an unrelated
    # anonymous mapping can land on a 64 MiB boundary by chance; without the limit the 24
    # threads made 15 heaps.
    assert heaps <= 4, f"{heaps} thread arena heaps"
