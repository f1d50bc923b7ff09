"""The proxy's cold read on loopback: what the proxy adds over a direct read of the origin.

An ``nbdkit file`` origin on a loopback TCP port, an ``xnbd-server --proxy`` of it with a fresh
cache in /dev/shm, and a libnbd client reading distinct 4 KiB blocks at QD 1, each after a pause
(``--pause``, default 20 ms: what a request on a 20 ms link finds, a CPU that has gone idle).
The same reads straight to the origin give the baseline. No root needed; a few seconds.

    python3 bench/coldread.py                 # 200 cold reads, 20 ms pause
    python3 bench/coldread.py --pause 0       # back to back
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

REPO = Path(__file__).resolve().parent.parent
SIZE = 256 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def reads(uri: str, blocks: list[int], pause: float) -> list[float]:
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    import nbd as libnbd  # Debian's python3-libnbd

    client = libnbd.NBD()
    client.connect_uri(uri)
    out = []
    try:
        for block in blocks:
            time.sleep(pause)
            start = time.perf_counter()
            client.pread(4096, block * 4096)
            out.append((time.perf_counter() - start) * 1000)
    finally:
        client.shutdown()
    return out


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p90 = ms[int(len(ms) * 0.9)]
    return f"median {statistics.median(ms):.3f} ms, p90 {p90:.3f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--pause", type=float, default=20.0, help="ms before each read")
    args = parser.parse_args()
    pause = args.pause / 1000
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        image = Path(tmp, "origin.img")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        origin_port, proxy_port = free_port(), free_port()
        origin = subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(origin_port), "file", str(image)]
        )
        try:
            wait_port(origin_port, origin)
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proxy = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xnbdd",
                    "--proxy",
                    "127.0.0.1",
                    str(origin_port),
                    f"{tmp}/cache",
                    f"{tmp}/bitmap",
                    f"{tmp}/ctl",
                    "--clear-bitmap",
                    "--laddr",
                    "127.0.0.1",
                    "--lport",
                    str(proxy_port),
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_port(proxy_port, proxy)
                nblocks = SIZE // 4096
                direct_blocks = random.Random(1).sample(range(nblocks), args.count)
                cold_blocks = random.Random(2).sample(range(nblocks), args.count)
                direct = reads(f"nbd://127.0.0.1:{origin_port}/", direct_blocks, pause)
                cold = reads(f"nbd://127.0.0.1:{proxy_port}/", cold_blocks, pause)
                warm = reads(f"nbd://127.0.0.1:{proxy_port}/", cold_blocks, pause)
            finally:
                proxy.terminate()
                proxy.wait(30)
        finally:
            origin.terminate()
            origin.wait(30)
    print(f"pause {args.pause:g} ms before each of {args.count} reads")
    print(f"direct to the origin: {summary(direct)}")
    print(f"proxy, cold:          {summary(cold)}")
    print(f"proxy, cached:        {summary(warm)}")
    over = statistics.median(cold) - statistics.median(direct)
    print(f"cold read over direct: {over:+.3f} ms (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
