"""4 KiB read latency while xnbd-server takes a snapshot without reflink (docs: bench/README.md).

A 1 GiB image of random data on /dev/shm (tmpfs: no reflink, so the snapshot is a copy), one
client doing 4 KiB random reads at queue depth 1 through python3-libnbd, SIGUSR1, and the reads'
latencies from the signal until the daemon logs the finished snapshot. Prints the worst and the
99th percentile, and how many reads were answered meanwhile.

    .venv/bin/python bench/snapshot_latency.py [--size-mib 1024] [--xnbd-cmd CMD]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-libnbd
import nbd

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
DONE = re.compile(r"snapshot (\S+): (\d+) bytes by (\w+) in ([\d.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--xnbd-cmd",
        default=f"env PYTHONPATH={REPO} {sys.executable} -m xnbdd",
        help="how to start xnbd-server (default: this checkout)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xnbdd-snapbench-", dir="/dev/shm"))
    try:
        image = work / "disk.img"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        port = free_port()
        log_path = work / "server.log"
        command = [
            *shlex.split(args.xnbd_cmd),
            "--target",
            str(image),
            "--lport",
            str(port),
            "--laddr",
            "127.0.0.1",
        ]
        with open(log_path, "wb") as log:
            # cwd: not this checkout, whose xnbdd `-m` would import before PYTHONPATH
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        try:
            while "ready: " not in log_path.read_text():
                time.sleep(0.05)
            run(server, port, log_path, args.size_mib * MiB)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(server: subprocess.Popen[bytes], port: int, log_path: Path, size: int) -> None:
    latencies: list[tuple[float, float]] = []  # (start, seconds)
    stop = threading.Event()

    def reader() -> None:
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/")
        rng = random.Random(1)
        while not stop.is_set():
            offset = rng.randrange(size // 4096) * 4096
            began = time.perf_counter()
            h.pread(4096, offset)
            latencies.append((began, time.perf_counter() - began))
        h.shutdown()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(4.0)  # a control: the worst wait with no snapshot
    signalled = time.perf_counter()
    server.send_signal(signal.SIGUSR1)
    while (match := DONE.search(log_path.read_text())) is None:
        time.sleep(0.01)
    finished = time.perf_counter()
    time.sleep(0.2)
    stop.set()
    thread.join()
    window = [(began, s) for began, s in latencies if signalled <= began + s and began <= finished]
    during = sorted(s for _, s in window)
    worst_at = max(window, key=lambda item: item[1])[0] - signalled if window else 0.0
    before = sorted(s for began, s in latencies if began + s < signalled)
    os.unlink(match.group(1))
    print(f"snapshot of {size // MiB} MiB by {match.group(3)}: {finished - signalled:.2f} s")
    print(f"the daemon's line: {match.group(0)}")
    point = re.search(r"snapshot point taken \(requests paused [\d.]+ ms\)", log_path.read_text())
    if point is not None:
        print(f"the daemon's line: {point.group(0)}")
    print(
        f"before it: {len(before)} reads, p99 {pct(before, 0.99) * 1e3:.2f} ms, "
        f"worst {before[-1] * 1e3:.1f} ms (the machine's own noise)"
    )
    print(
        f"during it: {len(during)} reads, p99 {pct(during, 0.99) * 1e3:.2f} ms, "
        f"worst {during[-1] * 1e3:.1f} ms (sent {worst_at:+.2f} s after the signal)"
    )


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


if __name__ == "__main__":
    main()
