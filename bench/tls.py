#!/usr/bin/env python3
"""What TLS costs: xnbd-server and nbdkit, each without and with ``--tls=require`` on the same
certificates, read by fio's nbd engine (libnbd; ``nbds://`` for TLS).

    .venv/bin/python bench/tls.py                  # 1 MiB seq read QD8, 4 KiB rand read QD16
    .venv/bin/python bench/tls.py --runtime 3 --runs 1 --size 256M

A report, not a test. fio's nbd engine cannot be given a certificate directory in its URI
(libnbd refuses local files there), so it runs with HOME pointing at a directory whose
.pki/libnbd holds the client's certificates, where libnbd looks by default. Certificates are
made with openssl (tests/tlscerts.py), the image is random data on /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tlscerts import make_certificates  # noqa: E402

MiB = 1 << 20
WORKLOADS = {
    "seqread-1m": (("--rw=read", "--bs=1M", "--iodepth=8"), "MiB/s"),
    "randread-4k-qd16": (("--rw=randread", "--bs=4k", "--iodepth=16"), "IOPS"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen")


@contextmanager
def server(kind: str, tls: bool, image: Path, certs: Path) -> Iterator[int]:
    port = free_port()
    if kind == "xnbd":
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "xnbdd", "--target", str(image)]
        argv += ["--lport", str(port), "--laddr", "127.0.0.1"]
        if tls:
            argv += ["--tls=require", "--tls-certificates", str(certs)]
    else:
        env = dict(os.environ)
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port)]
        if tls:
            argv += ["--tls=require", f"--tls-certificates={certs}"]
        argv += ["file", str(image)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def fio(port: int, tls: bool, workload: str, runtime: float, home: Path) -> float:
    args, unit = WORKLOADS[workload]
    scheme = "nbds" if tls else "nbd"
    report = home / "fio.json"
    subprocess.run(
        [
            "fio", "--name", workload, "--ioengine=nbd", f"--uri={scheme}://127.0.0.1:{port}/",
            "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--norandommap",
            "--randrepeat=0", "--output-format=json", f"--output={report}", *args,
        ],
        capture_output=True, text=True, check=True, env={**os.environ, "HOME": str(home)},
        timeout=runtime + 60,
    )  # fmt: skip
    job = json.loads(report.read_text())["jobs"][0]
    read = job["read"]
    return float(read["bw_bytes"] / MiB if unit == "MiB/s" else read["iops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job")
    parser.add_argument("--runs", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--size", default="512M", help="image size (fio-style suffix M/G)")
    args = parser.parse_args()
    for tool in ("fio", "nbdkit", "openssl"):
        if shutil.which(tool) is None:
            print(f"bench/tls.py: {tool} is not installed", file=sys.stderr)
            return 1
    size = int(args.size[:-1]) * (MiB if args.size.endswith("M") else 1024 * MiB)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as tmp:
        image = Path(shm) / "disk.img"
        with open(image, "wb") as f:
            for _ in range(size // (4 * MiB)):
                f.write(os.urandom(4 * MiB))
        certs = make_certificates(Path(tmp) / "certs")
        home = Path(tmp) / "home"
        (home / ".pki").mkdir(parents=True)
        (home / ".pki" / "libnbd").symlink_to(certs.client)
        rows: dict[tuple[str, bool], dict[str, float]] = {}
        for kind in ("xnbd", "nbdkit"):
            for tls in (False, True):
                with server(kind, tls, image, certs.server) as port:
                    rows[(kind, tls)] = {
                        w: statistics.median(
                            fio(port, tls, w, args.runtime, home) for _ in range(args.runs)
                        )
                        for w in WORKLOADS
                    }
    print(f"| server | TLS | {' | '.join(f'{w} ({WORKLOADS[w][1]})' for w in WORKLOADS)} |")
    print("|---|---|" + "---|" * len(WORKLOADS))
    for (kind, tls), figures in rows.items():
        label = "xnbd-server --target" if kind == "xnbd" else "nbdkit file"
        cells = []
        for w, value in figures.items():
            cell = f"{value:,.0f}"
            if tls:
                cell += f" ({value / rows[(kind, False)][w]:.0%} of plain)"
            cells.append(cell)
        print(f"| {label} | {'require' if tls else 'off'} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
