"""What a cold read through the proxy adds to the origin's round trip, on loopback.

The slow link (bench/slowlink.py) needs two network namespaces and a relay; its cold-read
figure is the proxy's cost after the idle of a 20 ms round trip. This reproduces that idle on
loopback: the origin is ``nbdkit --filter=delay file IMAGE rdelay=20ms``, and a python3-libnbd
client reads distinct 4 KiB blocks at queue depth 1, straight from the origin and then through
a fresh ``xnbd-server --proxy`` (cache in /dev/shm). The figure is the median through the
proxy less the median straight from the origin. Trees given with ``--tree`` (a directory with
an ``xnbdd`` package, e.g. from ``git archive REV xnbdd | tar -x -C DIR``) are measured round
by round, interleaved:

    python3 bench/coldread.py --rounds 4 --tree /tmp/A --tree /tmp/B
    python3 bench/coldread.py --pin 1          # the proxy on CPU 1 only
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE_MIB = 256
BLOCK = 4096


def import_nbd() -> Any:
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    import nbd  # Debian's python3-libnbd

    return nbd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def timed_reads(nbd: Any, uri: str, blocks: list[int]) -> list[float]:
    """Milliseconds per read of each block, one at a time."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    took = []
    for block in blocks:
        start = time.perf_counter()
        handle.pread(BLOCK, block * BLOCK)
        took.append((time.perf_counter() - start) * 1000)
    handle.shutdown()
    return took


def one_round(tree: Path, image: Path, reads: int, pin: str | None, seed: int) -> float:
    """Milliseconds a cold read through a fresh proxy of ``tree`` adds to a direct one."""
    nbd = import_nbd()
    nblocks = IMAGE_MIB * 1024 * 1024 // BLOCK
    origin_port, proxy_port = free_port(), free_port()
    delay = ["--filter=delay", "file", str(image), "rdelay=20ms"]
    origin = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(origin_port), *delay])
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
        base = Path(scratch)
        command = [
            *(["taskset", "-c", pin] if pin else []),
            sys.executable,
            "-m",
            "xnbdd",
            "--proxy",
            "127.0.0.1",
            str(origin_port),
            str(base / "cache"),
            str(base / "bitmap"),
            str(base / "ctl"),
            "--laddr",
            "127.0.0.1",
            "--lport",
            str(proxy_port),
        ]
        proxy = None
        try:
            wait_for_port(origin_port, origin, "nbdkit")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            # cwd: not the caller's directory, whose xnbdd (the checkout's) ``-m`` would import
            # ahead of PYTHONPATH's: every --tree would be measured as the checkout
            proxy = subprocess.Popen(
                command, env=env, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_for_port(proxy_port, proxy, "xnbd-server")
            rng = random.Random(seed)
            direct = timed_reads(
                nbd, f"nbd://127.0.0.1:{origin_port}/", rng.sample(range(nblocks), reads // 2)
            )
            cold = timed_reads(
                nbd, f"nbd://127.0.0.1:{proxy_port}/", rng.sample(range(nblocks), reads)
            )
        finally:
            for proc in (proxy, origin):
                if proc is not None:
                    proc.kill()
                    proc.wait()
    return statistics.median(cold) - statistics.median(direct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, help="an xnbdd tree (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=300, help="cold reads per round")
    parser.add_argument("--pin", help="run the proxy on this CPU only (taskset)")
    args = parser.parse_args()
    trees: list[Path] = args.tree or [REPO]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
        image = Path(scratch) / "origin.img"
        with open(image, "wb") as out:
            for _ in range(IMAGE_MIB):
                out.write(os.urandom(1 << 20))
        added: dict[Path, list[float]] = {tree: [] for tree in trees}
        for round_no in range(args.rounds):
            for tree in trees:
                ms = one_round(tree, image, args.reads, args.pin, seed=round_no)
                added[tree].append(ms)
                print(f"round {round_no + 1}  {tree}: +{ms:.3f} ms", flush=True)
    for tree, figures in added.items():
        shown = ", ".join(f"{ms:+.3f}" for ms in figures)
        print(f"{tree}: median {statistics.median(figures):+.3f} ms over a direct read ({shown})")


if __name__ == "__main__":
    main()
