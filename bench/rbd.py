#!/usr/bin/env python3
"""Benchmark xnbd-server on a Ceph RBD image beside qemu-nbd's rbd driver, on one cluster.

Starts the test cluster of tests/e2e/ceph.py (one mon, one memstore osd, under a temporary
directory), fills one image with random data, then serves that same image with
``xnbd-server --target rbd:POOL/IMAGE`` and ``qemu-nbd -f raw rbd:POOL/IMAGE:conf=...`` (one at
a time, never both at once) and runs each workload with fio's nbd engine, the servers taking
turns every round. Figures are medians of the rounds with their min-max. A report, not a test.

    .venv/bin/python bench/rbd.py               # 3 rounds of 4 s jobs, a 256 MiB image
    .venv/bin/python bench/rbd.py --runs 1 --runtime 2

The whole cluster lives in the osd's memory, so this measures the servers and librbd, not disks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from tests.e2e.ceph import CephCluster  # noqa: E402
from tests.e2e.ceph import start as start_ceph  # noqa: E402
from tests.serverproc import free_port, server_env  # noqa: E402

MiB = 1 << 20
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "seq-read-1m": ("MiB/s", ["--rw=read", "--bs=1M", "--iodepth=4"]),
    "seq-write-1m": ("MiB/s", ["--rw=write", "--bs=1M", "--iodepth=4"]),
    "randread-4k-qd16": ("IOPS", ["--rw=randread", "--bs=4k", "--iodepth=16"]),
    "randwrite-4k-qd16": ("IOPS", ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
}


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        done = subprocess.run(
            ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("server did not come up")


@contextmanager
def serving(kind: str, ceph: CephCluster, image: str, trees: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = server_env()
    if kind in trees:
        env["PYTHONPATH"] = trees[kind]
    if kind == "qemu-nbd rbd":
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port)]
        cmd += ["--cache=writeback", f"rbd:{image}:conf={ceph.conf}"]
    else:
        cmd = [sys.executable, "-m", "xnbdd", "--target", f"rbd:{image}"]
        cmd += ["--rbd-conf", str(ceph.conf), "--lport", str(port), "--laddr", "127.0.0.1"]
    # cwd "/": from the checkout, ``-m xnbdd`` would import its xnbdd ahead of PYTHONPATH's tree
    proc = subprocess.Popen(
        cmd, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc)
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(30)


def fio(uri: str, args: list[str], runtime: float, size: int) -> dict[str, float]:
    done = subprocess.run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--time_based",
            f"--runtime={runtime}",
            "--ramp_time=1",
            "--norandommap",
            "--randrepeat=0",
            f"--size={size}",
            "--output-format=json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=runtime + 120,
        check=True,
    )
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return {"MiB/s": side["bw_bytes"] / MiB, "IOPS": side["iops"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="one more xnbd-server row, run from the xnbdd tree in DIR (e.g. a variant from "
        "`git archive COMMIT xnbdd | tar -x -C DIR`)",
    )
    opts = ap.parse_args()
    trees = dict(item.split("=", 1) for item in opts.also)
    for tool in ("fio", "qemu-nbd", "nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/rbd.py: {tool} is missing")
    size = opts.size_mib * MiB
    servers = ["xnbd-server rbd", *trees, "qemu-nbd rbd"]
    with tempfile.TemporaryDirectory(prefix="xnbdd-bench-ceph-") as tmp:
        ceph = start_ceph(Path(tmp) / "ceph")
        try:
            image = f"{ceph.pool}/bench"
            fill = Path(tmp) / "fill.img"
            fill.write_bytes(os.urandom(size))  # reads move real data, never holes
            ceph.run("rbd", "import", "--no-progress", str(fill), image, timeout=300)
            fill.unlink()
            figures: dict[tuple[str, str], list[float]] = {}
            for rnd in range(opts.runs):
                order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                for kind in order:
                    with serving(kind, ceph, image, trees) as uri:
                        for key, (unit, args) in WORKLOADS.items():
                            value = fio(uri, args, opts.runtime, size)[unit]
                            figures.setdefault((kind, key), []).append(value)
        finally:
            ceph.stop()
    print(f"# {opts.runs} rounds of {opts.runtime:g} s (+1 s ramp), {opts.size_mib} MiB image")
    print("| workload | " + " | ".join(servers) + " | first / qemu-nbd |")
    print("|---|" + "---|" * (len(servers) + 1))
    for key, (unit, _) in WORKLOADS.items():
        cells = []
        medians = []
        for kind in servers:
            vals = figures[(kind, key)]
            med = statistics.median(vals)
            medians.append(med)
            cells.append(f"{med:,.0f} {unit} ({min(vals):,.0f}-{max(vals):,.0f})")
        print(f"| {key} | " + " | ".join(cells) + f" | {medians[0] / medians[-1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
