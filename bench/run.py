#!/usr/bin/env python3
"""Benchmark xnbd-server beside nbd-server, qemu-nbd and nbdkit with fio's nbd engine.

Every server serves its own pre-filled copy of one image on /dev/shm; all of them run for the
whole benchmark and fio visits them in turn for every workload and every round (the order rotates),
so slow drifts of a shared machine hit every server alike. Each figure is the median of the rounds,
printed with its min-max spread. A report, not a test: it never fails on a slow figure.

Our rows are xnbd-server in three modes (target; cow-target; proxy in front of an nbdkit origin,
its cache fully populated first), each with its ratio to nbdkit from the same run; the peers are
nbd-server, qemu-nbd, nbdkit, nbdkit's cow filter (cow-target's like: its writes go to an
overlay too) and bench/refloop.py, a reference loop (not a product).

    .venv/bin/python bench/run.py                  # what `make bench` runs: unpinned
    .venv/bin/python bench/run.py --pin            # each server on CPU 0 alone, fio on CPU 1
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
    jobs: int = 1  # fio --numjobs: each job is its own NBD connection
    same_core: bool = False  # pinned mode: fio on the server's CPU instead of its own
    unpinned: bool = False  # measured unpinned even in pinned mode
    default: bool = True  # run unless --only asks for others


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread-1m", "1 MiB seq read, QD8", ("--rw=read", "--bs=1M", "--iodepth=8"), "MiB/s"),
    Workload(
        "seqwrite-1m", "1 MiB seq write, QD8", ("--rw=write", "--bs=1M", "--iodepth=8"), "MiB/s"
    ),
    Workload(
        "randread-4k-qd1",
        "4 KiB rand read, QD1",
        ("--rw=randread", "--bs=4k", "--iodepth=1"),
        "IOPS",
        same_core=True,
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
        "randread-4k-4conn",
        "4 KiB rand read, 4 connections x QD16",
        ("--rw=randread", "--bs=4k", "--iodepth=16"),
        "IOPS",
        jobs=4,
        unpinned=True,
    ),
    Workload(
        "randrw70-4k-qd16",
        "4 KiB 70/30 rand mix, QD16",
        ("--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"),
        "IOPS",
        default=False,
    ),
)


@dataclass(frozen=True)
class Placement:
    """Where a job's server and fio may run: CPU lists for taskset, None = unpinned."""

    server: str | None = None
    fio: str | None = None

    def describe(self) -> str:
        if self.server is None and self.fio is None:
            return "unpinned"
        if self.server == self.fio:
            return f"server and fio on CPU {self.server}"
        return f"server on CPU {self.server}, fio on CPU {self.fio}"


def placement(wl: Workload, args: argparse.Namespace) -> Placement:
    if not args.pin or wl.unpinned:
        return Placement()
    cpu, fio_cpu = str(args.server_cpu), str(args.fio_cpu)
    return Placement(cpu, cpu if wl.same_core else fio_cpu)


# ---------------------------------------------------------------------------------------------
# Servers under test: key -> label in the table. xnbd rows get ratios; NBDKIT and REFLOOP are
# what they are compared with.

KINDS: dict[str, str] = {
    "xnbd-target": "xnbd target",
    "xnbd-cow": "xnbd cow-target",
    "xnbd-proxy": "xnbd proxy warm",
    "nbd-server": "nbd-server",
    "qemu-nbd": "qemu-nbd",
    "nbdkit": "nbdkit",
    "nbdkit-cow": "nbdkit cow filter",
    "refloop": "reference loop (not a product)",
}
ALIASES = {"xnbd-server": "xnbd-target", "xnbd": "xnbd-target"}
OURS = ("xnbd-target", "xnbd-cow", "xnbd-proxy")
PEERS = ("nbd-server", "qemu-nbd", "nbdkit")  # "best peer": the best of these
NBDKIT, REFLOOP = "nbdkit", "refloop"
# images in /dev/shm: base + overlay; origin + cache
COPIES = {"xnbd-cow": 2, "nbdkit-cow": 2, "xnbd-proxy": 2}


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


def all_cpus() -> str:
    """The CPUs this benchmark may use, as a taskset list: what "unpinned" means."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


@dataclass
class Server:
    """One NBD server under test: how to start it and, once started, where it is."""

    kind: str
    image: Path  # the data it serves (a proxy: its origin's image)
    workdir: Path
    xnbd_cmd: list[str] = field(default_factory=list)
    bgctl_cmd: list[str] = field(default_factory=list)
    python: str = sys.executable  # the reference loop's interpreter
    pin: str | None = None  # pinned mode: the CPU list it starts on
    port: int = 0
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    helpers: list[Server] = field(default_factory=list)  # a proxy's origin
    cpus: str | None = None  # its current taskset list; None: never pinned
    warm_seconds: float = 0.0  # a proxy: how long cache-all took

    @property
    def label(self) -> str:
        return KINDS[self.kind]

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    @property
    def control_socket(self) -> Path:
        return self.workdir / "control.sock"

    def command(self) -> list[str]:
        img, port = str(self.image), str(self.port)
        listen = ["--lport", port, "--laddr", "127.0.0.1"]
        if self.kind == "xnbd-target":
            return [*self.xnbd_cmd, "--target", img, *listen]
        if self.kind == "xnbd-cow":
            # The overlay goes to the same tmpfs directory as the base image.
            return [*self.xnbd_cmd, "--cow-target", img, "--cow-dir", str(self.workdir), *listen]
        if self.kind == "xnbd-proxy":
            origin = self.helpers[0]
            return [
                *self.xnbd_cmd,
                "--proxy",
                "127.0.0.1",
                str(origin.port),
                str(self.workdir / "cache.img"),
                str(self.workdir / "cache.bitmap"),
                str(self.control_socket),
                "--clear-bitmap",
                "--target-exportname",
                EXPORT,
                *listen,
            ]
        if self.kind == "refloop":
            script = str(REPO / "bench" / "refloop.py")
            return [self.python, script, img, "--port", port, "--addr", "127.0.0.1"]
        if self.kind == "qemu-nbd":
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
        if self.kind == "nbdkit":
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", port, "file", f"file={img}"]
        if self.kind == "nbdkit-cow":
            # cow-target's peer: the overlay (in TMPDIR, here the workdir on tmpfs) in 4 KiB
            # blocks, as cow-target's; the base is not written
            cow = ["--filter=cow", "file", f"file={img}", "cow-block-size=4096"]
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", port, *cow]
        if self.kind == "nbd-server":
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
        raise ValueError(self.kind)

    def start(self) -> None:
        if self.kind == "xnbd-proxy":
            # The origin: nbdkit on the image, on the proxy's CPU; idle once the cache is warm.
            origin = Server("nbdkit", self.image, self.workdir / "origin", pin=self.pin)
            origin.workdir.mkdir(exist_ok=True)
            self.helpers.append(origin)
            origin.start()
        self.port = free_port()
        self.log = self.workdir / f"{self.kind}.log"
        taskset = ["taskset", "-c", self.pin] if self.pin else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*taskset, *self.command()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**python_env(), "TMPDIR": str(self.workdir)},
                start_new_session=True,
            )
        self.cpus = self.pin
        if self.kind == "nbd-server":
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
        if self.kind == "xnbd-proxy":
            self.warm()

    def bgctl(self, *args: str) -> str:
        cmd = [*self.bgctl_cmd, *args, str(self.control_socket)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=python_env())
        if out.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def warm(self) -> None:
        """Fetch every block from the origin, then check the cache holds them all."""
        t0 = time.monotonic()
        self.bgctl("--cache-all")
        self.warm_seconds = time.monotonic() - t0
        status = json.loads(self.bgctl("--json", "--query"))
        cached, total = int(status["cached_blocks"]), int(status["total_blocks"])
        if not total or cached != total:
            raise RuntimeError(f"cache not warm after cache-all: {cached} / {total} blocks")

    def pids(self) -> list[int]:
        return [*process_tree(self.pid), *(p for h in self.helpers for p in h.pids())]

    def place(self, cpus: str | None) -> None:
        """Pin every thread of the server (and its helpers) to cpus; None: to every CPU."""
        if cpus is None and self.cpus is None:
            return  # never pinned: leave it alone
        want = cpus or all_cpus()
        if want == self.cpus:
            return
        for pid in self.pids():
            subprocess.run(
                ["taskset", "-a", "-p", "-c", want, str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,  # a per-connection child may have just exited
            )
        self.cpus = want

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
        for helper in self.helpers:
            helper.stop()

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])


def python_env() -> dict[str, str]:
    """xnbdd is imported from this checkout, ahead of anything installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}:{path}" if path else str(REPO)}


def interpreter(python: str) -> str:
    """Which Python: how it was built matters (on Debian's python3 the server answers 5-9 %
    more small requests per core than on pyenv's default build, bench/README.md)."""
    probe = "import platform, sys; print('Python', platform.python_version(), sys.executable)"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return f"{python} (?)"
    return out.stdout.strip() or f"{python} (?)"


def server_version(kind: str, xnbd_cmd: list[str], python: str) -> str:
    if kind == "refloop":
        return f"bench/refloop.py, {interpreter(python)}"
    cmd = {
        "qemu-nbd": ["qemu-nbd", "--version"],
        "nbdkit": ["nbdkit", "--version"],
        "nbdkit-cow": ["nbdkit", "--version"],
    }.get(kind, [*xnbd_cmd, "--version"])
    if kind == "nbd-server":  # no --version that exits 0 on every release
        cmd = ["dpkg-query", "-W", "-f=${Version}", "nbd-server"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=python_env())
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    version = text[0] if text else "?"
    # xnbdd started by an interpreter named in its command: say which
    pythons = [t for t in cmd if os.path.basename(t).startswith("python")]
    return f"{version}, {interpreter(pythons[0])}" if kind in OURS and pythons else version


# ---------------------------------------------------------------------------------------------
# Running fio


@dataclass
class Sample:
    value: float  # MiB/s or IOPS, as the workload's unit says
    server_cpu: float  # server CPU seconds per second of the job (1.0 = one core busy)
    fio_cpu: float  # fio's own CPU, same unit
    other_cpu: float  # everything else on the machine: other engineers' work, i.e. noise
    p99_us: float  # p99 completion latency (reads if any, else writes)


def run_fio(
    server: Server, wl: Workload, where: Placement, runtime: float, ramp: float, workdir: Path
) -> Sample:
    out = workdir / "fio.json"
    cmd = [
        *(["taskset", "-c", where.fio] if where.fio else []),
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
        f"--numjobs={wl.jobs}",
        "--group_reporting",  # one summed entry in "jobs", whatever numjobs is
        "--output-format=json",
        f"--output={out}",
        *wl.fio_args,
    ]
    server.place(where.server)
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
    kinds: list[str]
    workloads: list[Workload]
    places: dict[str, Placement]  # workload key -> where its jobs ran
    samples: dict[str, dict[str, list[Sample]]]  # workload key -> server kind -> samples
    rss_kib: dict[str, int]
    failed: dict[str, str]

    HEAD = (
        "server",
        "median (min-max)",
        "vs nbdkit",
        "vs ref loop",
        "vs best peer",
        "server CPU us/req",
        "p99 us",
        "other cores",
    )

    def of(self, wl: Workload, kind: str) -> list[Sample]:
        return self.samples[wl.key].get(kind, [])

    def median(self, wl: Workload, kind: str) -> float | None:
        values = [s.value for s in self.of(wl, kind)]
        return statistics.median(values) if values else None

    def cell(self, wl: Workload, kind: str) -> str:
        values = [s.value for s in self.of(wl, kind)]
        if not values:
            return "n/a"
        med, lo, hi = spread(values)
        if len(values) == 1:
            return fmt(med, wl.unit)
        return f"{fmt(med, wl.unit)} ({fmt(lo, wl.unit)}-{fmt(hi, wl.unit)})"

    def ratio(self, wl: Workload, kind: str, other: str) -> str:
        """Our median over another server's, same run; only our rows get ratios."""
        if kind not in OURS or other not in self.kinds:
            return ""
        ours, theirs = self.median(wl, kind), self.median(wl, other)
        return f"{ours / theirs:.2f}x" if ours is not None and theirs else "n/a"

    def best_peer(self, wl: Workload, kind: str) -> str:
        if kind not in OURS:
            return ""
        ours = self.median(wl, kind)
        peers = [(m, n) for n in PEERS if (m := self.median(wl, n)) is not None]
        if ours is None or not peers:
            return "n/a"
        best, name = max(peers)
        return f"{ours / best:.2f}x {name}" if best else "n/a"

    def cpu_cell(self, wl: Workload, kind: str) -> str:
        """Server CPU microseconds per request: steadier than throughput on a busy machine."""
        # MiB/s workloads move 1 MiB per request, so value is requests/s either way.
        per_op = [s.server_cpu / s.value * 1e6 for s in self.of(wl, kind) if s.value]
        return f"{statistics.median(per_op):.0f}" if per_op else "n/a"

    def p99_cell(self, wl: Workload, kind: str) -> str:
        p99 = [s.p99_us for s in self.of(wl, kind)]
        return f"{statistics.median(p99):,.0f}" if p99 else "n/a"

    def other_cell(self, wl: Workload, kind: str) -> str:
        """CPU that other processes used during these jobs: how far to trust the row."""
        other = [s.other_cpu for s in self.of(wl, kind)]
        return f"{statistics.median(other):.2f}" if other else "n/a"

    def heading(self, wl: Workload) -> str:
        return f"{wl.label} ({wl.unit}); {self.places[wl.key].describe()}"

    def rows(self, wl: Workload) -> list[list[str]]:
        return [
            [
                KINDS[k],
                self.cell(wl, k),
                self.ratio(wl, k, NBDKIT),
                self.ratio(wl, k, REFLOOP),
                self.best_peer(wl, k),
                self.cpu_cell(wl, k),
                self.p99_cell(wl, k),
                self.other_cell(wl, k),
            ]
            for k in self.kinds
        ]

    def rss_line(self) -> str:
        return "; ".join(
            f"{KINDS[k]} {self.rss_kib.get(k, 0) / 1024:.1f}"
            for k in self.kinds
            if k not in self.failed
        )

    def table(self, markdown: bool) -> str:
        done = [wl for wl in self.workloads if self.samples.get(wl.key)]
        if markdown:
            lines = [
                "| workload | " + " | ".join(self.HEAD) + " |",
                "|" + "---|" * (len(self.HEAD) + 1),
            ]
            for wl in done:
                for i, r in enumerate(self.rows(wl)):
                    lines.append("| " + " | ".join([self.heading(wl) if i == 0 else "", *r]) + " |")
            return "\n".join(lines)
        every = [list(self.HEAD), *(r for wl in done for r in self.rows(wl))]
        widths = [max(len(r[i]) for r in every) for i in range(len(self.HEAD))]

        def line(r: Sequence[str]) -> str:
            cells = (
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            return "  " + "  ".join(cells)

        out = [line(self.HEAD)]
        for wl in done:
            out += ["", self.heading(wl), *map(line, self.rows(wl))]
        return "\n".join(out)

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
        "--pin",
        action="store_true",
        help="pinned mode: every server (all its threads) on --server-cpu, fio on --fio-cpu; "
        "QD1 with fio on the server's CPU; the multi-connection row stays unpinned",
    )
    p.add_argument("--server-cpu", type=int, default=0, help="--pin: the servers' CPU (0)")
    p.add_argument("--fio-cpu", type=int, default=1, help="--pin: fio's CPU (1)")
    p.add_argument(
        "--servers",
        default=",".join(KINDS),
        help="comma-separated subset, in this order in the table: " + ", ".join(KINDS),
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated workload keys (default: all but randrw70-4k-qd16): "
        + ", ".join(w.key for w in WORKLOADS),
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter for xnbdd (unless --xnbd-cmd says otherwise) and the reference "
        "loop (default: this one); on a host whose python3 is not the distribution's, pass "
        "/usr/bin/python3 to measure what an installed xnbdd runs on",
    )
    p.add_argument(
        "--xnbd-cmd",
        default=None,
        help="how to start xnbd-server (default: --python -m xnbdd, with PYTHONPATH at the "
        "repository)",
    )
    p.add_argument(
        "--bgctl-cmd",
        default=None,
        help="how to run xnbd-bgctl (warms the proxy's cache with --cache-all; default: "
        "--python -m xnbdd.cli.bgctl)",
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
    args.xnbd_cmd = args.xnbd_cmd or f"{shlex.quote(args.python)} -m xnbdd"
    args.bgctl_cmd = args.bgctl_cmd or f"{shlex.quote(args.python)} -m xnbdd.cli.bgctl"
    return args


@contextlib.contextmanager
def started(servers: list[Server], failed: dict[str, str]) -> Iterator[list[Server]]:
    up: list[Server] = []
    try:
        for s in servers:
            try:
                s.start()
                up.append(s)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
                failed[s.kind] = f"did not start: {e}; log: {s.log_tail()}"
                print(f"  {s.kind}: {failed[s.kind]}", file=sys.stderr)
                s.stop()
        yield up
    finally:
        for s in up:
            s.stop()


def check_setup(args: argparse.Namespace, kinds: list[str]) -> str | None:
    """Why the benchmark cannot run as asked, or None."""
    tools = {"fio"} | {k for k in kinds if k in PEERS}
    if "xnbd-proxy" in kinds or "nbdkit-cow" in kinds:
        tools.add("nbdkit")  # the proxy's origin; the cow filter
    if args.pin:
        tools.add("taskset")
    for tool in sorted(tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap.sh test installs it)"
    if args.pin:
        mine = os.sched_getaffinity(0)
        if args.server_cpu == args.fio_cpu or not {args.server_cpu, args.fio_cpu} <= mine:
            return f"--pin needs two distinct CPUs among {sorted(mine)}"
    copies = 1 + sum(COPIES.get(k, 1) for k in kinds)
    if shutil.disk_usage(args.shm).free < (copies * args.size + 256) * MiB:
        return f"not enough room on {args.shm} for {copies} images of {args.size} MiB"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [ALIASES.get(n.strip(), n.strip()) for n in args.servers.split(",") if n.strip()]
    if unknown_kinds := [k for k in kinds if k not in KINDS]:
        print(f"unknown server(s): {', '.join(unknown_kinds)}", file=sys.stderr)
        return 2
    wanted = {k.strip() for k in args.only.split(",") if k.strip()}
    workloads = [w for w in WORKLOADS if w.key in wanted or (not wanted and w.default)]
    if unknown := wanted - {w.key for w in WORKLOADS}:
        print(f"unknown workload(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if why := check_setup(args, kinds):
        print(why, file=sys.stderr)
        return 1

    size = args.size * MiB
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    xnbd_cmd, bgctl_cmd = shlex.split(args.xnbd_cmd), shlex.split(args.bgctl_cmd)
    places = {w.key: placement(w, args) for w in workloads}
    mode = (
        f"pinned (--pin): servers on CPU {args.server_cpu}, fio on CPU {args.fio_cpu}"
        if args.pin
        else "unpinned"
    )
    failed: dict[str, str] = {}
    warm, warm_seconds = "", None
    samples: dict[str, dict[str, list[Sample]]] = {w.key: {} for w in workloads}
    load_before = os.getloadavg()
    started_at = time.time()

    with tempfile.TemporaryDirectory(prefix="xnbd-bench-", dir=args.shm) as tmp:
        work = Path(tmp)
        print(f"images: {len(kinds)} x {args.size} MiB of random data in {work}; {mode}")
        base = work / "base.img"
        make_image(base, size)
        servers = []
        for k in kinds:
            sdir = work / k
            sdir.mkdir()
            copy_image(base, sdir / "disk.img")
            pin = str(args.server_cpu) if args.pin else None
            servers.append(
                Server(k, sdir / "disk.img", sdir, xnbd_cmd, bgctl_cmd, args.python, pin=pin)
            )
        base.unlink()
        versions = {k: server_version(k, xnbd_cmd, args.python) for k in kinds}

        with started(servers, failed) as up, PeakRss() as rss:
            for s in up:
                rss.watch(s.kind, s.pid)
                print(f"  {s.kind:<12} pid {s.pid:<7} {s.uri}  ({versions[s.kind]})")
                if s.kind == "xnbd-proxy":
                    origin = s.helpers[0]
                    warm = (
                        f"xnbd proxy warm: cache-all of {args.size} MiB from its nbdkit origin "
                        f"took {s.warm_seconds:.1f} s; every block cached before the first job"
                    )
                    warm_seconds = s.warm_seconds
                    print(f"  {'':<12} origin pid {origin.pid} port {origin.port}; {warm}")
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
                        if s.kind in failed:
                            continue
                        done += 1
                        try:
                            smp = run_fio(s, wl, places[wl.key], args.runtime, args.ramp, work)
                        except (
                            RuntimeError,
                            subprocess.TimeoutExpired,
                            KeyError,
                            json.JSONDecodeError,
                        ) as e:
                            failed[s.kind] = f"{wl.key}: {e}; log: {s.log_tail()}"
                            print(f"  {s.kind} failed: {failed[s.kind]}", file=sys.stderr)
                            continue
                        samples[wl.key].setdefault(s.kind, []).append(smp)
                        print(
                            f"  [{done}/{jobs}] round {rnd + 1} {wl.key:<18} {s.kind:<11} "
                            f"{fmt(smp.value, wl.unit):>9} {wl.unit:<5}  server "
                            f"{smp.server_cpu:.2f} fio {smp.fio_cpu:.2f} "
                            f"other {smp.other_cpu:.2f} cores",
                            flush=True,
                        )
            rss.sample()
            rss_kib = dict(rss.peak_kib)

    results = Results(kinds, workloads, places, samples, rss_kib, failed)
    settings = (
        f"{mode}; runs={args.runs} runtime={args.runtime}s ramp={args.ramp}s "
        f"image={args.size} MiB on {args.shm}, {os.cpu_count()} CPUs, "
        f"load before {load_before[0]:.2f} after {os.getloadavg()[0]:.2f}"
    )
    command = shlex.join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    print()
    print(f"median (min-max) over {args.runs} round(s); {settings}")
    print(results.table(markdown=False))
    print()
    print(f"peak RSS (MiB): {results.rss_line()}")
    print(results.noise())
    for n, why in failed.items():
        print(f"FAILED {n}: {why}")

    md = [
        f"# xnbd-server benchmark {stamp}",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: {settings}.",
        "",
        *([warm, ""] if warm else []),
        "Versions: " + "; ".join(f"{KINDS[k]} {v}" for k, v in versions.items()),
        "",
        results.table(markdown=True),
        "",
        f"Peak RSS (MiB): {results.rss_line()}.",
        "",
        f"Noise: {results.noise()}.",
    ]
    md += [f"\nFAILED {n}: {why}" for n, why in failed.items()]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "started": started_at,
                "command": command,
                "settings": vars(args) | {"shm": str(args.shm), "out": str(out)},
                "host": {
                    "kernel": platform.release(),
                    "cpus": os.cpu_count(),
                    "load_before": load_before,
                    "load_after": os.getloadavg(),
                },
                "versions": versions,
                "proxy_cache_all_seconds": warm_seconds,
                "labels": {k: KINDS[k] for k in kinds},
                "workloads": {
                    w.key: {
                        "label": w.label,
                        "unit": w.unit,
                        "fio_args": w.fio_args,
                        "numjobs": w.jobs,
                        "placement": places[w.key].describe(),
                    }
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
