#!/usr/bin/env python3
"""A slow link between two network namespaces, for issue 5's proxy measurements.

The kernel here has no netem, so the link is built from parts we control:

    ns "<prefix>-a" (client side)                 ns "<prefix>-b" (origin side)
    10.77.0.1/24  veth --- tbf rate 1gbit --- veth  10.77.0.2/24
    relay: listens in A, forwards to B, holds every chunk DELAY ms in each direction

The relay terminates TCP on both legs, so it also bounds the bytes it holds (``--window``) the way
a real path's bandwidth-delay product bounds TCP's window; otherwise a bulk copy would see an
infinitely deep pipe.

    python3 bench/slowlink.py setup                         # namespaces, veth, tbf (root)
    python3 bench/slowlink.py relay --listen 10.77.0.1:9000 --connect 10.77.0.2:8520 &
    python3 bench/slowlink.py measure                       # iperf3 + TCP round trip, via relay
    python3 bench/slowlink.py exec a -- nbdinfo nbd://10.77.0.1:9000
    python3 bench/slowlink.py teardown

The proxy measurements of issue 5 (each printed with the command that produced it):

    python3 bench/slowlink.py all                           # setup, link, proxy, teardown
    python3 bench/slowlink.py proxy --size 512M             # proxy figures (after setup)

A sparse origin (issue 14): cache-all of a fully allocated image against one of the same size
with 20 % data scattered in 1 MiB extents (holes elsewhere), data compared afterwards:

    python3 bench/slowlink.py sparse --rate 200mbit --size 512M   # setup, both runs, teardown

``proxy`` starts the origin (nbdkit, or ``--origin xnbd`` for our own target) in namespace B
and the relays in A, then re-runs itself inside A (``proxy-inner``), where the proxy daemon and
its clients live: cold 4 KiB reads against the echo round trip, cache-all throughput against
iperf3 through the same relay, latency of requests on cached blocks while cache-all runs, and
the longest request across a switch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from xnbdd.control.client import ControlClient  # noqa: E402 (this checkout's, not an installed one)

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
ORIGIN_PORT, RELAY_PORT, ECHO_PORT, ECHO_RELAY_PORT, IPERF_PORT, IPERF_RELAY_PORT = (
    10809,
    9000,
    7000,
    9007,
    5201,
    9001,
)


@dataclass(frozen=True)
class Link:
    prefix: str = "xnbdsl"
    rate: str = "1gbit"

    @property
    def ns_a(self) -> str:
        return f"{self.prefix}-a"

    @property
    def ns_b(self) -> str:
        return f"{self.prefix}-b"

    def ns(self, side: str) -> str:
        return {"a": self.ns_a, "b": self.ns_b}[side]


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def setup(link: Link) -> None:
    teardown(link)
    sh("ip", "netns", "add", link.ns_a)
    sh("ip", "netns", "add", link.ns_b)
    sh(
        "ip",
        "link",
        "add",
        "slA",
        "netns",
        link.ns_a,
        "type",
        "veth",
        "peer",
        "name",
        "slB",
        "netns",
        link.ns_b,
    )
    for ns, dev, addr in ((link.ns_a, "slA", ADDR_A), (link.ns_b, "slB", ADDR_B)):
        sh(*in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev))
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
        # Egress shaping on both ends: the rate holds in each direction. The burst must be at
        # least rate/HZ or tbf cannot reach the rate; the latency bounds its queue.
        sh(
            *in_ns(
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                link.rate,
                "burst",
                "256kb",
                "latency",
                "20ms",
            )
        )
        # veth offloads would hand tbf 64 KiB super-packets; keep packets wire-sized.
        sh(*in_ns(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"), check=False)


def teardown(link: Link) -> None:
    for ns in (link.ns_a, link.ns_b):
        sh("ip", "netns", "del", ns, check=False)


# -- the delaying relay ---------------------------------------------------------------------------


class DelayPipe:
    """One direction: read from ``src``, send each chunk to ``dst`` ``delay`` seconds later.

    At most ``window`` bytes are held; beyond that the reader stops, and TCP pushes back on the
    sender just as a full path would.
    """

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int) -> None:
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.held = 0
        self.queue: list[tuple[float, int, bytes]] = []
        self.cond = threading.Condition()
        self.eof = False
        self.seq = 0

    def reader(self) -> None:
        while True:
            with self.cond:
                while self.held >= self.window:
                    self.cond.wait()
            try:
                data = self.src.recv(256 * 1024)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.seq += 1
                heapq.heappush(self.queue, (time.monotonic() + self.delay, self.seq, data))
                self.held += len(data)
                self.cond.notify_all()

    def writer(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.eof:
                    self.cond.wait()
                if not self.queue:
                    break
                due, _, data = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.cond:
                heapq.heappop(self.queue)
            try:
                self.dst.sendall(data)
            except OSError:
                break
            with self.cond:
                self.held -= len(data)
                self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)


def relay_one(client: socket.socket, target: tuple[str, int], delay: float, window: int) -> None:
    with client, socket.create_connection(target) as upstream:
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [
            DelayPipe(client, upstream, delay, window),
            DelayPipe(upstream, client, delay, window),
        ]
        threads = [
            threading.Thread(target=f, daemon=True) for p in pipes for f in (p.reader, p.writer)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def relay(listen: tuple[str, int], target: tuple[str, int], delay: float, window: int) -> None:
    """Forward every accepted connection to ``target``, ``delay`` seconds each way."""
    with socket.create_server(listen, reuse_port=False) as srv:
        print(
            f"relay {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, "
            f"{delay * 1000:.1f} ms each way",
            flush=True,
        )
        while True:
            client, _ = srv.accept()
            threading.Thread(
                target=relay_one, args=(client, target, delay, window), daemon=True
            ).start()


# -- measuring the link -------------------------------------------------------------------------


def echo_server(listen: tuple[str, int]) -> None:
    with socket.create_server(listen) as srv:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


def tcp_rtt(target: tuple[str, int], count: int = 50) -> list[float]:
    """Round trips of one 64-byte message, in milliseconds."""
    out = []
    with socket.create_connection(target) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            out.append((time.perf_counter() - t0) * 1000)
    return out


@contextlib.contextmanager
def background(cmd: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def show(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


def iperf_mbits(output: str) -> float:
    """The receiver's bitrate from iperf3's summary."""
    line = next(x for x in output.splitlines() if x.rstrip().endswith("receiver"))
    return float(line.split("Mbits/sec")[0].split()[-1])


def measure(link: Link, delay: float, seconds: int) -> float:
    """iperf3 over the bare shaped veth, then through the relay; the TCP echo round trip.
    Returns the iperf3 rate through the relay (Mbit/s): the link the proxy gets."""
    me = [sys.executable, __file__, "--prefix", link.prefix]
    with contextlib.ExitStack() as stack:
        stack.enter_context(background(in_ns(link.ns_b, "iperf3", "-s", "-p", str(IPERF_PORT))))
        stack.enter_context(background(in_ns(link.ns_b, *me, "echo", f"{ADDR_B}:{ECHO_PORT}")))
        stack.enter_context(
            background(in_ns(link.ns_a, *relay_command(link, IPERF_RELAY_PORT, IPERF_PORT, delay)))
        )
        stack.enter_context(
            background(in_ns(link.ns_a, *relay_command(link, ECHO_RELAY_PORT, ECHO_PORT, delay)))
        )
        direct_cmd = in_ns(
            link.ns_a, "iperf3", "-c", ADDR_B, "-p", str(IPERF_PORT), "-t", str(seconds), "-f", "m"
        )
        direct = iperf_mbits(sh(*direct_cmd).stdout)
        print(f"$ {show(direct_cmd)}\n  bare shaped veth: {direct:.0f} Mbit/s")
        relayed_cmd = in_ns(
            link.ns_a,
            "iperf3",
            "-c",
            ADDR_A,
            "-p",
            str(IPERF_RELAY_PORT),
            "-t",
            str(seconds),
            "-f",
            "m",
        )
        relayed = iperf_mbits(sh(*relayed_cmd).stdout)
        print(f"$ {show(relayed_cmd)}\n  through the delaying relay: {relayed:.0f} Mbit/s")
        rtt_cmd = in_ns(link.ns_a, *me, "rtt", f"{ADDR_A}:{ECHO_RELAY_PORT}")
        print(f"$ {show(rtt_cmd)}\n  " + sh(*rtt_cmd).stdout.strip())
    return relayed


def relay_command(link: Link, listen_port: int, target_port: int, delay: float) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--prefix",
        link.prefix,
        "relay",
        "--listen",
        f"{ADDR_A}:{listen_port}",
        "--connect",
        f"{ADDR_B}:{target_port}",
        "--delay-ms",
        str(delay * 1000),
    ]


# -- the proxy on the slow link ------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)


def proxy_outer(
    link: Link, delay: float, size: int, origin: str, link_mbits: float, bgctl: str
) -> None:
    """Origin in B, relays in A, then the measurements themselves inside A."""
    image = Path(f"/dev/shm/slowlink-origin-{os.getpid()}.img")
    with open(image, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    me = [sys.executable, __file__, "--prefix", link.prefix]
    if origin == "nbdkit":
        origin_cmd = ["nbdkit", "-f", "-i", ADDR_B, "-p", str(ORIGIN_PORT), "file", str(image)]
    else:
        origin_cmd = [
            sys.executable,
            "-m",
            "xnbdd",
            "--target",
            str(image),
            "--laddr",
            ADDR_B,
            "--lport",
            str(ORIGIN_PORT),
        ]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(background(in_ns(link.ns_b, *origin_cmd)))
            stack.enter_context(background(in_ns(link.ns_b, *me, "echo", f"{ADDR_B}:{ECHO_PORT}")))
            stack.enter_context(
                background(in_ns(link.ns_a, *relay_command(link, RELAY_PORT, ORIGIN_PORT, delay)))
            )
            stack.enter_context(
                background(
                    in_ns(link.ns_a, *relay_command(link, ECHO_RELAY_PORT, ECHO_PORT, delay))
                )
            )
            print(f"origin: $ {show(in_ns(link.ns_b, *origin_cmd))}")
            relay_cmd = relay_command(link, RELAY_PORT, ORIGIN_PORT, delay)
            print(f"relay:  $ {show(in_ns(link.ns_a, *relay_cmd))}")
            subprocess.run(
                in_ns(
                    link.ns_a,
                    *me,
                    "proxy-inner",
                    "--size",
                    str(size),
                    "--link-mbits",
                    str(link_mbits),
                    "--bgctl-cmd",
                    bgctl,
                ),
                check=True,
            )
    finally:
        image.unlink()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ms: Sequence[float]) -> str:
    return (
        f"median {statistics.median(ms):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms, "
        f"max {max(ms):.2f} ms ({len(ms)} requests)"
    )


def import_nbd() -> Any:
    if "/usr/lib/python3/dist-packages" not in sys.path:
        sys.path.append("/usr/lib/python3/dist-packages")
    import nbd  # Debian's python3-libnbd

    return nbd


@dataclass
class Proxy:
    """An xnbd-server --proxy of the origin behind the relay, inside namespace A."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] = field(init=False)
    files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = f"/dev/shm/slowlink-{self.name}-{os.getpid()}"
        self.cache, self.bitmap, self.ctl = (
            Path(f"{base}.cache"),
            Path(f"{base}.bm"),
            Path(f"{base}.ctl"),
        )
        self.log = Path(f"{base}.log")
        self.files = [self.cache, self.bitmap, Path(f"{self.bitmap}.xnbdd"), self.ctl, self.log]
        self.command = [
            sys.executable,
            "-m",
            "xnbdd",
            "--proxy",
            ADDR_A,
            str(RELAY_PORT),
            str(self.cache),
            str(self.bitmap),
            str(self.ctl),
            "--clear-bitmap",
            "--laddr",
            "127.0.0.1",
            "--lport",
            str(self.port),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 20
        while "ready: " not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def control(self, cmd: str, **args: Any) -> dict[str, Any]:
        with ControlClient(str(self.ctl), timeout=None) as client:
            return client.call(cmd, **args)

    def logged_at(self, text: str) -> float:
        """Wall-clock time (seconds, ms resolution) of the first log line containing ``text``."""
        for line in self.log.read_text(errors="replace").splitlines():
            if text in line:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
        raise LookupError(f"{text!r} is not in {self.log}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        for path in self.files:
            path.unlink(missing_ok=True)


@dataclass
class Load:
    """One libnbd client, QD 1, 4 KiB requests at random on [first, stop) blocks, until told
    to stop; every request's start time and latency is kept, failures counted."""

    uri: str
    first: int
    stop: int
    write_share: float = 0.3
    samples: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        nbd = import_nbd()
        handle = nbd.NBD()
        handle.connect_uri(self.uri)
        rng = random.Random(7)
        payload = os.urandom(4096)
        while not self.done.is_set():
            offset = rng.randrange(self.first, self.stop) * 4096
            t0 = time.perf_counter()
            try:
                if rng.random() < self.write_share:
                    handle.pwrite(payload, offset)
                else:
                    handle.pread(4096, offset)
            except nbd.Error as exc:
                self.failures.append(str(exc))
            self.samples.append((t0, (time.perf_counter() - t0) * 1000))
        handle.shutdown()

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(60)

    def between(self, start: float, end: float) -> list[float]:
        return [ms for t0, ms in self.samples if start <= t0 <= end]


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time of a process (utime + stime), or of the whole machine (every core, not idle)."""
    ticks = os.sysconf("SC_CLK_TCK")
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(cpu) - cpu[3] - cpu[4]) / ticks  # minus idle and iowait


@contextlib.contextmanager
def cpu_report(what: str, pid: int) -> Iterator[None]:
    """Print the proxy's and the machine's CPU use (in cores) over the block."""
    t0, own0, all0 = time.perf_counter(), cpu_seconds(pid), cpu_seconds()
    yield
    wall = time.perf_counter() - t0
    own, total = (cpu_seconds(pid) - own0) / wall, (cpu_seconds() - all0) / wall
    print(
        f"  CPU during {what}: proxy {own:.2f} cores, whole machine {total:.2f} of "
        f"{os.cpu_count()} cores"
    )


def timed(what: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    what()
    return time.perf_counter() - t0


def proxy_inner(size: int, link_mbits: float, bgctl: str) -> None:
    nbd = import_nbd()
    nblocks = size // 4096
    rtts = tcp_rtt((ADDR_A, ECHO_RELAY_PORT), count=100)
    rtt = statistics.median(rtts)
    print(
        f"\nTCP echo round trip through the relay: median {rtt:.2f} ms, "
        f"p99 {percentile(rtts, 0.99):.2f} ms"
    )

    # 1. A cold 4 KiB read: straight to the origin through the relay, then through the proxy.
    direct = nbd.NBD()
    direct.connect_uri(f"nbd://{ADDR_A}:{RELAY_PORT}/")
    rng = random.Random(1)
    base = [
        timed(lambda: direct.pread(4096, rng.randrange(nblocks) * 4096)) * 1000 for _ in range(100)
    ]
    direct.shutdown()
    print(f"cold 4 KiB read, libnbd straight to the origin via the relay: {summary(base)}")
    proxy = Proxy("cold", 18100)
    try:
        client = nbd.NBD()
        client.connect_uri(proxy.uri)
        blocks = random.Random(2).sample(range(nblocks), 200)
        cold = [timed(partial(client.pread, 4096, b * 4096)) * 1000 for b in blocks]
        client.shutdown()
        print(f"$ {show(proxy.command)}")
        print(f"cold 4 KiB read through the proxy (QD 1, 200 distinct blocks): {summary(cold)}")
        print(
            f"  = RTT + {statistics.median(cold) - rtt:.2f} ms (median), proxy overhead over a "
            f"direct read {statistics.median(cold) - statistics.median(base):+.2f} ms"
        )
    finally:
        proxy.close()

    # 2. cache-all alone on a fresh cache, twice: as issue 10 counts it, from starting xnbd-bgctl
    # to its exit (the cache complete and durable); and over the control socket (no start-up).
    for how in ("bgctl", "socket"):
        proxy = Proxy(f"bulk-{how}", 18101)
        try:
            command = [*shlex.split(bgctl), "--cache-all", str(proxy.ctl)]
            if how == "bgctl":  # an operator looks first; the machine's page cache is small
                query = [*shlex.split(bgctl), "--query", str(proxy.ctl)]
                run = partial(subprocess.run, query, check=True, stdout=subprocess.DEVNULL)
                ms = 1000 * timed(run)
                print(f"  xnbd-bgctl --query before it: {ms:.0f} ms (its files were read then)")
            wall0 = time.time()
            with cpu_report("cache-all", proxy.proc.pid):
                if how == "bgctl":
                    env = {**os.environ, "PYTHONPATH": str(REPO)}
                    seconds = timed(partial(subprocess.run, command, check=True, env=env))
                else:
                    seconds = timed(
                        partial(proxy.control, "cache-all", blocks_per_request=31, progress=False)
                    )
            wall1 = wall0 + seconds
            started, done = proxy.logged_at("cache-all started"), proxy.logged_at("cache-all compl")
            rate = size * 8 / seconds / 1e6
            what = f"$ {show(command)}" if how == "bgctl" else "the control socket"
            print(
                f"  in the proxy's log: {1000 * (started - wall0):.0f} ms from the start to the "
                f"request, {done - started:.3f} s to a durable cache, "
                f"{1000 * (wall1 - done):.0f} ms from there to the end"
            )
            print(
                f"cache-all of {size >> 20} MiB ({what}, 31 blocks per request): "
                f"{seconds:.3f} s = {rate:.0f} Mbit/s = {100 * rate / link_mbits:.1f} % of iperf3 "
                f"through the relay ({link_mbits:.0f} Mbit/s)"
            )
        finally:
            proxy.close()

    # 3. Requests on cached blocks while cache-all runs; 4. then the switch.
    proxy = Proxy("busy", 18102)
    try:
        warm = 16384  # the first 64 MiB cached by a client before cache-all
        client = nbd.NBD()
        client.connect_uri(proxy.uri)
        for offset in range(0, warm * 4096, 4 << 20):
            client.pread(4 << 20, offset)
        client.shutdown()
        with Load(proxy.uri, 0, warm) as load:
            time.sleep(0.5)
            t0 = time.perf_counter()
            with cpu_report("cache-all with the client's load", proxy.proc.pid):
                seconds = timed(
                    lambda: proxy.control("cache-all", blocks_per_request=31, progress=False)
                )
            during = load.between(t0, t0 + seconds)
            slow = sum(ms > 2.0 for ms in during)
        print(
            f"4 KiB requests (70 % read, 30 % write, QD 1) on cached blocks while cache-all runs "
            f"({seconds:.2f} s): {summary(during)}; {slow} over 2 ms; {len(load.failures)} failed"
        )
        with Load(proxy.uri, 0, nblocks) as load:
            time.sleep(1.0)
            t0 = time.perf_counter()
            seconds = timed(lambda: proxy.control("switch", force=False))
            time.sleep(1.0)
        around = [(t - t0, ms) for t, ms in load.samples if t0 - 0.5 <= t <= t0 + seconds + 0.5]
        at, longest = max(around, key=lambda sample: sample[1])
        # requests that were in flight at some moment of the switch command
        overlapping = [ms for t, ms in load.samples if t <= t0 + seconds and t + ms / 1000 >= t0]
        before = [ms for t, ms in load.samples if t < t0 - 0.5]
        print(
            f"4 KiB requests (70/30, QD 1, whole disk) across the switch "
            f"({seconds * 1000:.1f} ms for the switch command): "
            f"{len(overlapping)} overlapped it, the longest of them "
            f"{max(overlapping, default=0.0):.2f} ms; within +-0.5 s: longest {longest:.2f} ms, "
            f"started {at * 1000:+.1f} ms from the switch command, "
            f"{summary([ms for _, ms in around])}; {len(load.failures)} failed\n"
            f"  the same load in the second before: {summary(before)}"
        )
    finally:
        proxy.close()


# -- a sparse origin --------------------------------------------------------------------------


def write_images(size: int, fraction: float, extent: int = 1 << 20) -> tuple[Path, Path]:
    """A fully allocated image and a sparse one (``fraction`` of its ``extent`` slots hold
    random data, scattered; holes elsewhere), both in /dev/shm."""
    full = Path(f"/dev/shm/slowlink-full-{os.getpid()}.img")
    sparse = Path(f"/dev/shm/slowlink-sparse-{os.getpid()}.img")
    with open(full, "wb") as f:
        for _ in range(size // extent):
            f.write(os.urandom(extent))
    slots = size // extent
    chosen = random.Random(14).sample(range(slots), round(slots * fraction))
    with open(sparse, "wb") as f:
        f.truncate(size)
        for slot in sorted(chosen):
            f.seek(slot * extent)
            f.write(os.urandom(extent))
    return full, sparse


def sparse_outer(link: Link, delay: float, size: int, origin: str) -> None:
    """For each image: origin in B, relay in A, cache-all timed in A; then the ratio."""
    me = [sys.executable, __file__, "--prefix", link.prefix]
    full, sparse = write_images(size, 0.2)
    seconds: dict[str, float] = {}
    try:
        for label, image in (("full", full), ("sparse", sparse)):
            if origin == "nbdkit":
                origin_cmd = ["nbdkit", "-f", "-i", ADDR_B, "-p", str(ORIGIN_PORT), "file"]
                origin_cmd.append(str(image))
            else:
                origin_cmd = [sys.executable, "-m", "xnbdd", "--target", str(image)]
                origin_cmd += ["--laddr", ADDR_B, "--lport", str(ORIGIN_PORT)]
            with contextlib.ExitStack() as stack:
                stack.enter_context(background(in_ns(link.ns_b, *origin_cmd)))
                relay_cmd = relay_command(link, RELAY_PORT, ORIGIN_PORT, delay)
                stack.enter_context(background(in_ns(link.ns_a, *relay_cmd)))
                print(f"origin: $ {show(in_ns(link.ns_b, *origin_cmd))}")
                inner = in_ns(link.ns_a, *me, "sparse-inner", "--label", label, str(image))
                out = sh(*inner).stdout
                print(out, end="")
                seconds[label] = float(out.split("cache-all seconds ")[1].split()[0].rstrip(";"))
    finally:
        full.unlink()
        sparse.unlink()
    ratio = seconds["sparse"] / seconds["full"]
    print(
        f"sparse / full cache-all time: {seconds['sparse']:.2f} s / {seconds['full']:.2f} s "
        f"= {ratio:.2f}x"
    )


def sparse_inner(label: str, image: Path) -> None:
    """In A: a fresh proxy of the origin behind the relay, cache-all through the control
    socket, the bytes it fetched and zeroed, then the cache compared with the origin image."""
    proxy = Proxy(f"sparse-{label}", 18110)
    try:
        seconds = timed(lambda: proxy.control("cache-all", blocks_per_request=31, progress=False))
        status = proxy.control("query")
        fetched = status["fetched_blocks"] * 4096
        zeroed = status["zeroed_blocks"] * 4096
        same = subprocess.run(["cmp", "-s", str(proxy.cache), str(image)]).returncode == 0
        print(
            f"{label}: cache-all seconds {seconds:.2f}; fetched {fetched >> 20} MiB, "
            f"zeroed without fetching {zeroed >> 20} MiB, origin answers block status: "
            f"{status['remote_allocation']}; cache == origin image: {same}"
        )
        if not same:
            raise SystemExit(f"{label}: the cache differs from the origin image")
    finally:
        proxy.close()


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--prefix", default="xnbdsl", help="namespace name prefix")
    p.add_argument("--rate", default="1gbit", help="tbf rate of the veth link")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup")
    sub.add_parser("teardown")
    r = sub.add_parser("relay")
    r.add_argument("--listen", type=hostport, required=True)
    r.add_argument("--connect", type=hostport, required=True)
    r.add_argument("--delay-ms", type=float, default=10.0)
    r.add_argument("--window", type=int, default=4 << 20, help="bytes held per direction")
    for name in ("measure", "proxy", "all", "sparse"):
        m = sub.add_parser(name)
        m.add_argument("--delay-ms", type=float, default=10.0)
        m.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
        m.add_argument("--size", type=parse_size, default=1 << 30, help="origin size")
        m.add_argument("--origin", choices=["nbdkit", "xnbd"], default="nbdkit")
        m.add_argument(
            "--bgctl-cmd",
            default=f"{sys.executable} -m xnbdd.cli.bgctl",
            help="xnbd-bgctl as a shell word list (cache-all is timed from its start)",
        )
        m.add_argument(
            "--link-mbits",
            type=float,
            default=0.0,
            help="proxy: the link's rate if already measured (else iperf3 first)",
        )
    si = sub.add_parser("sparse-inner")
    si.add_argument("--label", required=True)
    si.add_argument("image", type=Path)
    inner = sub.add_parser("proxy-inner")
    inner.add_argument("--size", type=int, required=True)
    inner.add_argument("--link-mbits", type=float, required=True)
    inner.add_argument("--bgctl-cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("listen", type=hostport)
    t = sub.add_parser("rtt")
    t.add_argument("target", type=hostport)
    x = sub.add_parser("exec", help="run a command in namespace a or b")
    x.add_argument("side", choices=["a", "b"])
    x.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    link = Link(args.prefix, args.rate)

    if args.cmd in ("setup", "all", "sparse"):
        for tool in ("ip", "tc", "iperf3"):
            if shutil.which(tool) is None:
                print(f"{tool} is missing", file=sys.stderr)
                return 1
        setup(link)
        print(f"{link.ns_a} {ADDR_A} <-> {link.ns_b} {ADDR_B}, tbf {link.rate}")
    if args.cmd == "teardown":
        teardown(link)
    elif args.cmd == "relay":
        relay(args.listen, args.connect, args.delay_ms / 1000, args.window)
    elif args.cmd == "measure":
        measure(link, args.delay_ms / 1000, args.seconds)
    elif args.cmd in ("proxy", "all"):
        try:
            link_mbits = args.link_mbits or measure(link, args.delay_ms / 1000, args.seconds)
            proxy_outer(
                link, args.delay_ms / 1000, args.size, args.origin, link_mbits, args.bgctl_cmd
            )
        finally:
            if args.cmd == "all":
                teardown(link)
    elif args.cmd == "sparse":
        try:
            sparse_outer(link, args.delay_ms / 1000, args.size, args.origin)
        finally:
            teardown(link)
    elif args.cmd == "sparse-inner":
        sparse_inner(args.label, args.image)
    elif args.cmd == "proxy-inner":
        proxy_inner(args.size, args.link_mbits, args.bgctl_cmd)
    elif args.cmd == "echo":
        echo_server(args.listen)
    elif args.cmd == "rtt":
        ms = tcp_rtt(args.target)
        print(
            f"TCP round trip through the relay: median {statistics.median(ms):.2f} ms, "
            f"min {min(ms):.2f}, max {max(ms):.2f} ms ({len(ms)} samples)"
        )
    elif args.cmd == "exec":
        command = (
            [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
        )
        return subprocess.call(in_ns(link.ns(args.side), *command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
