#!/usr/bin/env python3
"""The Python cost of one request in the data plane's batch loop, without sockets.

A ``DataPlane`` over a target image, driven in-process through one batch at a time (``_read``,
``_parse``, ``_send``: what its thread does for a client that keeps its queue full, as on one
core at queue depth 1), with a transport that hands it ``--depth`` 4 KiB requests per read and
takes every reply at once. The image's ``pread``/``pwrite`` are real; no socket, no wake-up, no
other thread. Two figures:

- time per request, the best of ``--rounds`` (moves with the machine: compare trees
  interleaved, or interpreters, on a quiet machine);
- with ``--callgrind``, user-space instructions per request counted by valgrind (the same run,
  minus one that stops before the requests): repeatable to 0.2 %, unlike ``percall.py``, whose
  client and server race.

    python3 bench/planecost.py --image /dev/shm/disk.img              # 4 KiB reads, depth 1
    python3 bench/planecost.py --image IMG --op write --depth 16
    python3 bench/planecost.py --image IMG --callgrind                 # instructions/request
    python3 bench/planecost.py --image IMG --mode cow --op write --depth 16   # first writes
    PYTHONPATH=/tmp/old python3 bench/planecost.py --image IMG         # another tree

The image must be at least 1 GiB (requests fall anywhere in the first GiB). ``--mode cow`` serves
it as cow-target, a fresh overlay beside it for every round; its writes go to distinct blocks
(every one a first write, building its batch costs the harness a copy per request).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# xnbdd from PYTHONPATH if given (another tree), else from this checkout
sys.path.append(str(Path(__file__).resolve().parent.parent))

BLOCKS = (1 << 30) >> 12  # 4 KiB blocks in the first GiB


def batches(op: str, depth: int, count: int = 256) -> list[bytes]:
    """``count`` batches of ``depth`` requests at random offsets (a fixed seed)."""
    from xnbdd.proto.consts import REQUEST_MAGIC, Cmd
    from xnbdd.proto.wire import REQUEST

    rng = random.Random(1)
    cmd = int(Cmd.WRITE if op == "write" else Cmd.READ)
    payload = os.urandom(4096) if op == "write" else b""
    out = []
    for n in range(count):
        reqs = [
            REQUEST.pack(REQUEST_MAGIC, 0, cmd, n * depth + k, rng.randrange(BLOCKS) << 12, 4096)
            + payload
            for k in range(depth)
        ]
        out.append(b"".join(reqs))
    return out


class Transport:
    """What ``tls.Transport`` offers the plane: reads yield the next batch, writes take all."""

    zero_copy = True
    fd = -1

    def __init__(self, batches: list[bytes]) -> None:
        self.batches = batches
        self.next = 0

    def readv(self, views: list[memoryview]) -> int:
        data = self.batches[self.next % len(self.batches)]
        self.next += 1
        views[0][: len(data)] = data
        return len(data)

    def writev(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        return sum(len(p) for p in parts)

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        return count

    def has_output(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def close_notify(self) -> None:
        pass


class DistinctWrites(Transport):
    """4 KiB writes to distinct blocks of the first GiB in a random order (a fixed seed): on a
    fresh cow-target overlay, every one a first write."""

    def __init__(self, depth: int, count: int) -> None:
        from xnbdd.proto.consts import REQUEST_MAGIC, Cmd
        from xnbdd.proto.wire import REQUEST

        order = list(range(BLOCKS))
        random.Random(1).shuffle(order)
        write = int(Cmd.WRITE)
        self.heads = [
            REQUEST.pack(REQUEST_MAGIC, 0, write, n, block << 12, 4096)
            for n, block in enumerate(order[:count])
        ]
        self.payload = os.urandom(4096)
        self.depth = depth
        self.next = 0

    def readv(self, views: list[memoryview]) -> int:
        first = self.next * self.depth
        self.next += 1
        # header, payload, header, payload, ...: built here, so the batches need no memory
        data = self.payload.join(self.heads[first : first + self.depth]) + self.payload
        views[0][: len(data)] = data
        return len(data)


def measure(image: str, op: str, depth: int, requests: int, rounds: int, mode: str) -> float:
    """Seconds per request, the best of ``rounds`` (after one round of warm-up). cow-target:
    each round on a fresh overlay, its writes to distinct blocks (first writes)."""
    import tempfile

    import trio

    from xnbdd.backends.cow import CowBackend
    from xnbdd.backends.file import FileBackend
    from xnbdd.budget import ByteBudget, Limits
    from xnbdd.dataplane import DataPlane
    from xnbdd.export import Export
    from xnbdd.proto.messages import Negotiated, transmission_flags

    passes = requests // depth
    fixed = batches(op, depth)
    target = None if mode == "cow" else FileBackend.open(image, readonly=False)

    def one_round(scratch: str) -> float:
        backend = CowBackend.open(image, cow_dir=scratch) if target is None else target
        export = Export("disk", backend)
        info = export.info()
        tx = transmission_flags(info.tx_flags, structured=True, extended=False, contexts=False)
        negotiated = Negotiated(info, tx, True, {}, False)  # structured replies, as libnbd asks
        fresh = target is None and op == "write"
        transport = DistinctWrites(depth, passes * depth) if fresh else Transport(fixed)
        plane = DataPlane(
            transport,  # type: ignore[arg-type]  # duck-typed: the methods the plane calls
            export,
            negotiated,
            Limits(),
            ByteBudget(Limits()),
            lambda request, cost: None,
        )
        read, parse, send = plane._read, plane._parse, plane._send
        start = time.perf_counter()
        for _ in range(passes):
            read()
            parse()
            send()
        seconds = time.perf_counter() - start
        if isinstance(backend, CowBackend):
            trio.run(backend.close)  # removes the overlay
        return seconds

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(image))) as scratch:
        one_round(scratch)
        best = min((one_round(scratch) for _ in range(rounds)), default=0.0)
    return best / max(1, passes * depth)


def instructions(args: argparse.Namespace) -> int:
    """User-space instructions per request under callgrind: a run with the requests minus one
    without, so start-up and imports cancel out."""

    def collected(requests: int) -> int:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--image",
            args.image,
            "--op",
            args.op,
            "--mode",
            args.mode,
            "--depth",
            str(args.depth),
            "--requests",
            str(requests),
            "--rounds",
            "1",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", out.stderr)
        if not found:
            raise SystemExit(f"planecost: no count from valgrind:\n{out.stderr[-2000:]}")
        return int(found.group(1))

    depth: int = args.depth
    requests = 20_000 // depth * depth
    # each run does a warm-up round and one measured round: 2 x requests in all
    return round((collected(requests) - collected(0)) / (2 * requests))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--image", required=True, help="a file of at least 1 GiB (on /dev/shm)")
    p.add_argument("--op", choices=["read", "write"], default="read")
    p.add_argument(
        "--mode",
        choices=["target", "cow"],
        default="target",
        help="cow: cow-target over the image, a fresh overlay per round (writes: first writes)",
    )
    p.add_argument("--depth", type=int, default=1, help="requests per read of the socket")
    p.add_argument("--requests", type=int, default=200_000, help="per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--callgrind", action="store_true", help="count instructions instead")
    args = p.parse_args(argv)
    if os.path.getsize(args.image) < 1 << 30:
        p.error(f"{args.image} is smaller than 1 GiB")
    if args.mode == "cow" and args.op == "write" and args.requests > BLOCKS:
        p.error(f"cow-target's first writes: at most {BLOCKS} requests per round")
    label = f"{args.mode} {args.op} depth {args.depth}"
    if args.callgrind:
        print(f"{label}: {instructions(args):,} instructions/request")
    elif args.requests >= args.depth:
        seconds = measure(args.image, args.op, args.depth, args.requests, args.rounds, args.mode)
        print(f"{label}: {seconds * 1e6:.3f} us/request (best of {args.rounds})")
    else:  # the empty run ``--callgrind`` subtracts: everything but the requests
        measure(args.image, args.op, args.depth, 0, 0, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
