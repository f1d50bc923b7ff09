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

Status: a skeleton. ``measure`` runs iperf3 and a TCP echo round trip through the relay; the
proxy measurements of issue 5 (cache-all rate, cold read RTT, p99 during cache-all, across a
switch) are still to be written on top of it.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"


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
    sh("ip", "link", "add", "slA", "netns", link.ns_a, "type", "veth",
       "peer", "name", "slB", "netns", link.ns_b)
    for ns, dev, addr in ((link.ns_a, "slA", ADDR_A), (link.ns_b, "slB", ADDR_B)):
        sh(*in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev))
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
        # Egress shaping on both ends: the rate holds in each direction. The burst must be at
        # least rate/HZ or tbf cannot reach the rate; the latency bounds its queue.
        sh(*in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", link.rate,
                  "burst", "256kb", "latency", "20ms"))
        # veth offloads would hand tbf 64 KiB super-packets; keep packets wire-sized.
        sh(*in_ns(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"),
           check=False)


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
        pipes = [DelayPipe(client, upstream, delay, window),
                 DelayPipe(upstream, client, delay, window)]
        threads = [threading.Thread(target=f, daemon=True)
                   for p in pipes for f in (p.reader, p.writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def relay(listen: tuple[str, int], target: tuple[str, int], delay: float, window: int) -> None:
    """Forward every accepted connection to ``target``, ``delay`` seconds each way."""
    with socket.create_server(listen, reuse_port=False) as srv:
        print(f"relay {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, "
              f"{delay * 1000:.1f} ms each way", flush=True)
        while True:
            client, _ = srv.accept()
            threading.Thread(target=relay_one, args=(client, target, delay, window),
                             daemon=True).start()


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


def measure(link: Link, delay: float, seconds: int) -> None:
    me = [sys.executable, __file__, "--prefix", link.prefix]
    with contextlib.ExitStack() as stack:
        stack.enter_context(background(in_ns(link.ns_b, "iperf3", "-s", "-p", "5201")))
        stack.enter_context(background(in_ns(link.ns_b, *me, "echo", f"{ADDR_B}:7000")))
        stack.enter_context(background(in_ns(
            link.ns_a, *me, "relay", "--listen", f"{ADDR_A}:9001", "--connect", f"{ADDR_B}:5201",
            "--delay-ms", str(delay * 1000))))
        stack.enter_context(background(in_ns(
            link.ns_a, *me, "relay", "--listen", f"{ADDR_A}:9007", "--connect", f"{ADDR_B}:7000",
            "--delay-ms", str(delay * 1000))))
        raw = sh(*in_ns(link.ns_a, "iperf3", "-c", ADDR_B, "-p", "5201", "-t", str(seconds),
                        "-f", "m"))
        print("iperf3 direct over the shaped veth:\n" + raw.stdout.strip().splitlines()[-3])
        relayed = sh(*in_ns(link.ns_a, "iperf3", "-c", ADDR_A, "-p", "9001", "-t",
                            str(seconds), "-f", "m"))
        print("iperf3 through the delaying relay:\n" + relayed.stdout.strip().splitlines()[-3])
        rtts = sh(*in_ns(link.ns_a, *me, "rtt", f"{ADDR_A}:9007"))
        print(rtts.stdout.strip())


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
    m = sub.add_parser("measure")
    m.add_argument("--delay-ms", type=float, default=10.0)
    m.add_argument("--seconds", type=int, default=5)
    e = sub.add_parser("echo")
    e.add_argument("listen", type=hostport)
    t = sub.add_parser("rtt")
    t.add_argument("target", type=hostport)
    x = sub.add_parser("exec", help="run a command in namespace a or b")
    x.add_argument("side", choices=["a", "b"])
    x.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    link = Link(args.prefix, args.rate)

    if args.cmd == "setup":
        for tool in ("ip", "tc", "iperf3"):
            if shutil.which(tool) is None:
                print(f"{tool} is missing", file=sys.stderr)
                return 1
        setup(link)
        print(f"{link.ns_a} {ADDR_A} <-> {link.ns_b} {ADDR_B}, tbf {link.rate}")
    elif args.cmd == "teardown":
        teardown(link)
    elif args.cmd == "relay":
        relay(args.listen, args.connect, args.delay_ms / 1000, args.window)
    elif args.cmd == "measure":
        measure(link, args.delay_ms / 1000, args.seconds)
    elif args.cmd == "echo":
        echo_server(args.listen)
    elif args.cmd == "rtt":
        ms = tcp_rtt(args.target)
        print(f"TCP round trip through the relay: median {statistics.median(ms):.2f} ms, "
              f"min {min(ms):.2f}, max {max(ms):.2f} ms ({len(ms)} samples)")
    elif args.cmd == "exec":
        command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] \
            else args.command
        return subprocess.call(in_ns(link.ns(args.side), *command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
