"""A python3-libnbd client that writes checksummed blocks and reads them back, in a loop.

Run by tests/e2e/test_fdstore.py with the system's python3 (Debian's python3-libnbd) inside a
container's network namespace: ``python3 verify_client.py URI [BLOCKS [FIRST]]`` (BLOCKS: use
only BLOCKS blocks of 64 KiB, from block FIRST (0); all of them by default). Every round writes
DEPTH blocks at once (aio, so requests are in flight whenever the server stops), reads them back
at once, and reads one block written earlier; each block carries its number, a round counter
and a SHA-256 of the rest, so a lost, stale or torn write is seen. It prints ``progress N``
every PROGRESS rounds, runs until a line ``quit`` on stdin (then disconnects cleanly) or the
first error, and ends with one JSON line: rounds, verify errors, the error (if any), and the
round latencies.
"""

from __future__ import annotations

import hashlib
import json
import random
import select
import struct
import sys
import time

import nbd

BLOCK = 64 * 1024
DEPTH = 4
PROGRESS = 20
HEAD = struct.Struct(">QQ")  # block number, round


def block_bytes(number: int, round_no: int) -> bytes:
    rng = random.Random(number * 1_000_003 + round_no)
    body = HEAD.pack(number, round_no) + rng.randbytes(BLOCK - HEAD.size - 32)
    return body + hashlib.sha256(body).digest()


def wait_all(h: nbd.NBD, cookies: list[int]) -> None:
    pending = set(cookies)
    while pending:
        h.poll(-1)
        for cookie in list(pending):
            if h.aio_command_completed(cookie):  # raises on an error reply
                pending.discard(cookie)


def quit_requested() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and sys.stdin.readline().strip() == "quit"


def main() -> int:
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    blocks = h.get_size() // BLOCK - first
    if len(sys.argv) > 2:
        blocks = min(blocks, int(sys.argv[2]))
    written: dict[int, int] = {}  # block -> round of its last write
    latencies: list[tuple[float, float]] = []  # (start, seconds) of each round
    verify_errors = 0
    error = ""
    rounds = 0
    print("connected", flush=True)
    try:
        while not quit_requested():
            start = time.monotonic()
            numbers = random.sample(range(first, first + blocks), DEPTH)
            cookies = []
            for n in numbers:
                data = block_bytes(n, rounds)
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), n * BLOCK))
            wait_all(h, cookies)
            for n in numbers:
                written[n] = rounds
            old = random.choice(list(written))
            check = [*numbers, old]
            buffers = [nbd.Buffer(BLOCK) for _ in check]
            wait_all(h, [h.aio_pread(b, n * BLOCK) for b, n in zip(buffers, check, strict=True)])
            for b, n in zip(buffers, check, strict=True):
                if bytes(b.to_bytearray()) != block_bytes(n, written[n]):
                    verify_errors += 1
            latencies.append((start, time.monotonic() - start))
            rounds += 1
            if rounds % PROGRESS == 0:
                print(f"progress {rounds}", flush=True)
        h.shutdown()
    except nbd.Error as err:
        error = f"{err.string} (errno {err.errno})"
    print(
        json.dumps(
            {
                "rounds": rounds,
                "verify_errors": verify_errors,
                "error": error,
                "ended_at": time.monotonic(),
                "latencies": latencies,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
