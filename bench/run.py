#!/usr/bin/env python3
"""Benchmark xnbd-server beside nbd-server, qemu-nbd and nbdkit with fio's nbd engine.

Every server serves its own pre-filled copy of one image on /dev/shm; all of them run for the
whole benchmark and fio visits them in turn for every workload and every round (the order rotates),
so slow drifts of a shared machine hit every server alike. Each figure is the median of the rounds,
printed with its min-max spread. A report, not a test: it never fails on a slow figure.

    .venv/bin/python bench/run.py                  # what `make bench` runs
    python3 bench/run.py --quick                   # smoke test: short jobs, one round
    python3 bench/run.py --runs 5 --runtime 10 --only randread-4k-qd16
    python3 bench/run.py --xnbd-cmd 'python3 /tmp/run_xnbd.py'   # another way to start xnbdd

See bench/README.md for what is measured and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
EXPORT = "disk"  # every server answers to this export name


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    fio_args: tuple[str, ...]
    unit: str  # "MiB/s" or "IOPS"


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread-1m", "1 MiB seq read, QD4", ("--rw=read", "--bs=1M", "--iodepth=4"), "MiB/s"),
    Workload(
        "seqwrite-1m", "1 MiB seq write, QD4", ("--rw=write", "--bs=1M", "--iodepth=4"), "MiB/s"
    ),
    Workload(
        "randread-4k-qd1",
        "4 KiB rand read, QD1",
        ("--rw=randread", "--bs=4k", "--iodepth=1"),
        "IOPS",
    ),
    Workload(
        "randread-4k-qd16",
        "4 KiB rand read, QD16",
        ("--rw=randread", "--bs=4k", "--iodepth=16"),
        "IOPS",
    ),
    Workload(
        "randwrite-4k-qd16",
        "4 KiB rand write, QD16",
        ("--rw=randwrite", "--bs=4k", "--iodepth=16"),
        "IOPS",
    ),
    Workload(
        "randrw70-4k-qd16",
        "4 KiB 70/30 rand mix, QD16",
        ("--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"),
        "IOPS",
    ),
)


# ---------------------------------------------------------------------------------------------
# /proc readers


def _proc_status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat split after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children (nbd-server forks one per connection)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    return [pid, *children_of(pid)]


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process, its live children and its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    main = _stat_fields(pid)
    if main is not None:
        total += sum(int(x) for x in main[11:15])  # utime stime cutime cstime
    for kid in children_of(pid):
        fields = _stat_fields(kid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat.

    Busy is user + nice + system + steal. Interrupt and softirq time is left out: loopback TCP
    is largely processed there, on behalf of the job itself, and is not charged to any process.
    """
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    busy = parts[0] + parts[1] + parts[2] + parts[7]
    total = sum(parts[:8])  # guest time is already inside user
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, total / tick


class PeakRss:
    """Polls the summed VmHWM of a process tree: forked children's peaks vanish when they exit."""

    def __init__(self) -> None:
        self.peak_kib: dict[str, int] = {}
        self._watch: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._watch[name] = pid
            self.peak_kib.setdefault(name, 0)

    def sample(self) -> None:
        with self._lock:
            for name, pid in self._watch.items():
                kib = sum(_proc_status_kib(p, "VmHWM") for p in process_tree(pid))
                self.peak_kib[name] = max(self.peak_kib[name], kib)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, alive: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in alive:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f} s")


@dataclass
class Server:
    """One NBD server under test: how to start it and, once started, where it is."""

    name: str
    image: Path
    workdir: Path
    xnbd_cmd: list[str] = field(default_factory=list)
    port: int = 0
    pid: int = 0
    version: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def command(self) -> list[str]:
        img, port = str(self.image), str(self.port)
        if self.name == "xnbd-server":
            return [*self.xnbd_cmd, "--target", img, "--lport", port, "--laddr", "127.0.0.1"]
        if self.name == "qemu-nbd":
            # Writeback cache and a thread pool, as a VM host would run it; -t stays up between
            # fio jobs, -e lets a job connect while the previous connection is still closing.
            return [
                "qemu-nbd",
                "-f",
                "raw",
                "--cache=writeback",
                "--aio=threads",
                "-t",
                "-e",
                "8",
                "-b",
                "127.0.0.1",
                "-p",
                port,
                "-x",
                EXPORT,
                img,
            ]
        if self.name == "nbdkit":
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", port, "file", f"file={img}"]
        if self.name == "nbd-server":
            conf = self.workdir / "nbd-server.conf"
            conf.write_text(
                "[generic]\n"
                "    listenaddr = 127.0.0.1\n"
                f"    port = {port}\n"
                "    allowlist = true\n"
                f"[{EXPORT}]\n"
                f"    exportname = {img}\n"
                "    flush = true\n    fua = true\n    trim = true\n"
            )
            return ["nbd-server", "-C", str(conf), "-p", str(self.workdir / "nbd-server.pid")]
        raise ValueError(self.name)

    def start(self) -> None:
        self.port = free_port()
        self.log = self.workdir / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=python_env(),
                start_new_session=True,
            )
        if self.name == "nbd-server":
            # It daemonizes: the process we started exits and the pid file names the server.
            self.proc.wait(timeout=10)
            if self.proc.returncode != 0:
                raise RuntimeError(f"exited with status {self.proc.returncode}")
            pidfile = self.workdir / "nbd-server.pid"
            deadline = time.monotonic() + 10
            while not pidfile.exists() or not pidfile.read_text().strip():
                if time.monotonic() > deadline:
                    raise RuntimeError("no pid file")
                time.sleep(0.05)
            self.pid = int(pidfile.read_text().split()[0])
            wait_for_port(self.port, [], 10)
        else:
            self.pid = self.proc.pid
            wait_for_port(self.port, [self.proc], 30)

    def stop(self) -> None:
        pids = process_tree(self.pid) if self.pid else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])


def python_env() -> dict[str, str]:
    """xnbdd is imported from this checkout, ahead of anything installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}:{path}" if path else str(REPO)}


def server_version(name: str, xnbd_cmd: list[str]) -> str:
    cmd = {
        "xnbd-server": [*xnbd_cmd, "--version"],
        "qemu-nbd": ["qemu-nbd", "--version"],
        "nbdkit": ["nbdkit", "--version"],
    }.get(name)
    if cmd is None:  # nbd-server has no --version that exits 0 on every release
        cmd = ["dpkg-query", "-W", "-f=${Version}", "nbd-server"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=python_env())
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


# ---------------------------------------------------------------------------------------------
# Running fio


@dataclass
class Sample:
    value: float  # MiB/s or IOPS, as the workload's unit says
    server_cpu: float  # server CPU seconds per second of the job (1.0 = one core busy)
    fio_cpu: float  # fio's own CPU, same unit
    other_cpu: float  # everything else on the machine: other engineers' work, i.e. noise
    p99_us: float  # p99 completion latency (reads if any, else writes)


def run_fio(server: Server, wl: Workload, runtime: float, ramp: float, workdir: Path) -> Sample:
    out = workdir / "fio.json"
    cmd = [
        "fio",
        "--name",
        wl.key,
        "--ioengine=nbd",
        f"--uri={server.uri}",
        "--time_based",
        f"--runtime={runtime}",
        f"--ramp_time={ramp}",
        "--norandommap",
        "--randrepeat=0",
        "--numjobs=1",
        "--output-format=json",
        f"--output={out}",
        *wl.fio_args,
    ]
    cpu0, (busy0, _) = tree_cpu_seconds(server.pid), machine_busy_seconds()
    fio0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + ramp + 60)
    wall = time.monotonic() - t0
    fio1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(0.1)  # let nbd-server reap its per-connection child so cutime includes it
    cpu1, (busy1, _) = tree_cpu_seconds(server.pid), machine_busy_seconds()
    if proc.returncode != 0:
        raise RuntimeError(f"fio exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    read, write = job["read"], job["write"]
    if wl.unit == "MiB/s":
        value = (read["bw_bytes"] + write["bw_bytes"]) / MiB
    else:
        value = read["iops"] + write["iops"]
    # All of fio's threads over the whole run (its own usr_cpu/sys_cpu count only the job thread).
    fio_cpu = (fio1.ru_utime + fio1.ru_stime - fio0.ru_utime - fio0.ru_stime) / wall
    server_cpu = (cpu1 - cpu0) / wall
    other = max(0.0, (busy1 - busy0) / wall - server_cpu - fio_cpu)
    side = read if read["io_bytes"] else write
    p99 = side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
    return Sample(value, server_cpu, fio_cpu, other, p99)


# ---------------------------------------------------------------------------------------------
# Images


def make_image(path: Path, size: int) -> None:
    """Random data everywhere, so reads move real bytes instead of tmpfs holes."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        block = os.urandom(chunk)
        for off in range(0, size, chunk):
            # Vary each chunk cheaply so no server could dedupe or compress its way through.
            f.write(off.to_bytes(8, "little") + block[8 : min(chunk, size - off)])


def copy_image(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


# ---------------------------------------------------------------------------------------------
# Report


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit == "IOPS" or value >= 100 else f"{value:,.1f}"


@dataclass
class Results:
    servers: list[str]
    samples: dict[str, dict[str, list[Sample]]]  # workload key -> server -> samples
    rss_kib: dict[str, int]
    failed: dict[str, str]

    def cell(self, wl: Workload, name: str) -> str:
        values = [s.value for s in self.samples[wl.key].get(name, [])]
        if not values:
            return "n/a"
        med, lo, hi = spread(values)
        if len(values) == 1:
            return fmt(med, wl.unit)
        return f"{fmt(med, wl.unit)} ({fmt(lo, wl.unit)}-{fmt(hi, wl.unit)})"

    def median(self, wl: Workload, name: str) -> float | None:
        values = [s.value for s in self.samples[wl.key].get(name, [])]
        return statistics.median(values) if values else None

    def ratio(self, wl: Workload) -> str:
        ours = self.median(wl, "xnbd-server")
        peers = [
            (m, n)
            for n in self.servers
            if n != "xnbd-server"
            if (m := self.median(wl, n)) is not None
        ]
        if ours is None or not peers:
            return "n/a"
        best, best_name = max(peers)
        return f"{ours / best:.2f}x {best_name}" if best else "n/a"

    def cpu_cell(self, wl: Workload, name: str) -> str:
        """Server CPU microseconds per request: steadier than throughput on a busy machine."""
        per_op = [
            s.server_cpu / s.value * 1e6 for s in self.samples[wl.key].get(name, []) if s.value
        ]  # MiB/s workloads move 1 MiB per request, so value is requests/s
        return f"{statistics.median(per_op):.0f}" if per_op else "n/a"

    def table(self, markdown: bool) -> str:
        head = ["workload", *self.servers, "xnbd / best peer"]
        rows = [
            [f"{wl.label} ({wl.unit})", *(self.cell(wl, n) for n in self.servers), self.ratio(wl)]
            for wl in WORKLOADS
            if wl.key in self.samples
        ]
        rows.append(
            [
                "peak RSS (MiB)",
                *(
                    f"{self.rss_kib.get(n, 0) / 1024:.1f}" if n not in self.failed else "n/a"
                    for n in self.servers
                ),
                "",
            ]
        )
        cpu_rows = [
            [
                f"  server CPU us/request, {wl.label}",
                *(self.cpu_cell(wl, n) for n in self.servers),
                "",
            ]
            for wl in WORKLOADS
            if wl.key in self.samples
        ]
        rows += cpu_rows
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(c.strip() for c in r) + " |" for r in rows]
            return "\n".join(lines)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(r: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])

    def noise(self) -> str:
        other = [s.other_cpu for per in self.samples.values() for ss in per.values() for s in ss]
        rel = []
        for per in self.samples.values():
            for ss in per.values():
                if len(ss) > 1:
                    med, lo, hi = spread([s.value for s in ss])
                    if med:
                        rel.append((hi - lo) / med)
        parts = []
        if other:
            parts.append(
                f"CPU used by other processes during jobs: median "
                f"{statistics.median(other):.2f} cores, max {max(other):.2f} "
                f"(of {os.cpu_count()})"
            )
        if rel:
            parts.append(
                f"run-to-run spread (max-min)/median: median {statistics.median(rel):.0%}"
                f", worst {max(rel):.0%}"
            )
        return "; ".join(parts) or "no noise figures (one round, no samples)"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, help="rounds; each figure is their median (default 3)")
    p.add_argument("--runtime", type=float, help="seconds measured per fio job (default 5)")
    p.add_argument("--ramp", type=float, help="seconds of warm-up before measuring (default 1)")
    p.add_argument("--size", type=int, help="image size in MiB, one copy per server (default 1024)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test defaults: 1 round, 2 s jobs, no ramp, 256 MiB images",
    )
    p.add_argument(
        "--servers",
        default="xnbd-server,nbd-server,qemu-nbd,nbdkit",
        help="comma-separated subset, in this order in the table",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated workload keys: " + ", ".join(w.key for w in WORKLOADS),
    )
    p.add_argument(
        "--xnbd-cmd",
        default=f"{shlex.quote(sys.executable)} -m xnbdd",
        help="how to start xnbd-server (default: this interpreter, -m xnbdd, with "
        "PYTHONPATH at the repository)",
    )
    p.add_argument("--shm", type=Path, default=Path("/dev/shm"), help="where images go")
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<timestamp>)"
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="after starting the servers, print their pids and ports and wait for "
        "Enter before running (to attach a profiler)",
    )
    args = p.parse_args(argv)
    # Options given explicitly win over both sets of defaults.
    defaults = (
        {"runs": 1, "runtime": 2, "ramp": 0, "size": 256}
        if args.quick
        else {"runs": 3, "runtime": 5, "ramp": 1, "size": 1024}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


@contextlib.contextmanager
def started(servers: list[Server], failed: dict[str, str]) -> Iterator[list[Server]]:
    up: list[Server] = []
    try:
        for s in servers:
            try:
                s.start()
                up.append(s)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                failed[s.name] = f"did not start: {e}; log: {s.log_tail()}"
                print(f"  {s.name}: {failed[s.name]}", file=sys.stderr)
                s.stop()
        yield up
    finally:
        for s in up:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    wanted = {k.strip() for k in args.only.split(",") if k.strip()}
    workloads = [w for w in WORKLOADS if not wanted or w.key in wanted]
    if unknown := wanted - {w.key for w in WORKLOADS}:
        print(f"unknown workload(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for tool in ["fio", *(n for n in names if n != "xnbd-server")]:
        if shutil.which(tool) is None:
            print(
                f"{tool} is not installed (scripts/bootstrap.sh test installs it)", file=sys.stderr
            )
            return 1
    size = args.size * MiB
    needed = size * (len(names) + 1)
    if shutil.disk_usage(args.shm).free < needed + 256 * MiB:
        print(
            f"not enough room on {args.shm} for {len(names) + 1} images of {args.size} MiB",
            file=sys.stderr,
        )
        return 1

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    xnbd_cmd = shlex.split(args.xnbd_cmd)
    failed: dict[str, str] = {}
    samples: dict[str, dict[str, list[Sample]]] = {w.key: {} for w in workloads}
    load_before = os.getloadavg()
    started_at = time.time()

    with tempfile.TemporaryDirectory(prefix="xnbd-bench-", dir=args.shm) as tmp:
        work = Path(tmp)
        print(f"images: {len(names)} x {args.size} MiB of random data in {work}")
        base = work / "base.img"
        make_image(base, size)
        servers = []
        for n in names:
            sdir = work / n
            sdir.mkdir()
            copy_image(base, sdir / "disk.img")
            servers.append(Server(n, sdir / "disk.img", sdir, xnbd_cmd=xnbd_cmd))
        base.unlink()
        versions = {n: server_version(n, xnbd_cmd) for n in names}

        with started(servers, failed) as up, PeakRss() as rss:
            for s in up:
                rss.watch(s.name, s.pid)
                print(f"  {s.name:<12} pid {s.pid:<7} {s.uri}  ({versions[s.name]})")
            if args.hold:
                input("servers are up; press Enter to start the jobs ")
            jobs = args.runs * len(workloads) * len(up)
            eta = jobs * (args.runtime + args.ramp + 0.5)
            print(f"{jobs} fio jobs, about {eta / 60:.1f} min")
            done = 0
            for rnd in range(args.runs):
                for wi, wl in enumerate(workloads):
                    # Rotate who goes first so no server always follows the same neighbour.
                    shift = (rnd + wi) % max(1, len(up))
                    for s in up[shift:] + up[:shift]:
                        if s.name in failed:
                            continue
                        done += 1
                        try:
                            smp = run_fio(s, wl, args.runtime, args.ramp, work)
                        except (
                            RuntimeError,
                            subprocess.TimeoutExpired,
                            KeyError,
                            json.JSONDecodeError,
                        ) as e:
                            failed[s.name] = f"{wl.key}: {e}; log: {s.log_tail()}"
                            print(f"  {s.name} failed: {failed[s.name]}", file=sys.stderr)
                            continue
                        samples[wl.key].setdefault(s.name, []).append(smp)
                        print(
                            f"  [{done}/{jobs}] round {rnd + 1} {wl.key:<18} {s.name:<12} "
                            f"{fmt(smp.value, wl.unit):>9} {wl.unit:<5}  server "
                            f"{smp.server_cpu:.2f} fio {smp.fio_cpu:.2f} "
                            f"other {smp.other_cpu:.2f} cores",
                            flush=True,
                        )
            rss.sample()
            rss_kib = dict(rss.peak_kib)

    results = Results(names, samples, rss_kib, failed)
    settings = (
        f"runs={args.runs} runtime={args.runtime}s ramp={args.ramp}s "
        f"image={args.size} MiB on {args.shm}, {os.cpu_count()} CPUs, "
        f"load before {load_before[0]:.2f} after {os.getloadavg()[0]:.2f}"
    )
    text = results.table(markdown=False)
    print()
    print(f"median (min-max) over {args.runs} round(s); {settings}")
    print(text)
    print(results.noise())
    for n, why in failed.items():
        print(f"FAILED {n}: {why}")

    md = [
        f"# xnbd-server benchmark {stamp}",
        "",
        f"Settings: {settings}.",
        "",
        "Versions: " + "; ".join(f"{n} {v}" for n, v in versions.items()),
        "",
        results.table(markdown=True),
        "",
        f"Noise: {results.noise()}.",
    ]
    md += [f"\nFAILED {n}: {why}" for n, why in failed.items()]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "started": started_at,
                "settings": vars(args) | {"shm": str(args.shm), "out": str(out)},
                "host": {
                    "kernel": platform.release(),
                    "cpus": os.cpu_count(),
                    "load_before": load_before,
                    "load_after": os.getloadavg(),
                },
                "versions": versions,
                "workloads": {
                    w.key: {"label": w.label, "unit": w.unit, "fio_args": w.fio_args}
                    for w in workloads
                },
                "samples": {
                    k: {n: [vars(s) for s in ss] for n, ss in per.items()}
                    for k, per in samples.items()
                },
                "peak_rss_kib": rss_kib,
                "failed": failed,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"results: {out}/results.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
