"""Run the fuzzer against one rig: inputs, the reply checker, liveness probes, guards and RSS.

A *finding* is anything the server must never do: a reply that breaks framing or answers a
request twice or never, a write accepted on a read-only export, no progress for ``HANG``
seconds, a connection dropped while every request was well framed, a dead server process, a
guard changed, an RSS above the bound, or a probe (fresh client: write, flush, read back) that
fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests import rawnbd
from tests.fuzz import wire
from tests.fuzz.harness import Endpoint, Rig, rig, rss_kib

HANG = 20.0  # seconds without progress: the server hangs
RSS_BOUND_KIB = 640 * 1024  # per process; budgets of 64 MiB (256 in the wrapper's servers)
HANDSHAKE_SHARE = 0.8  # of the connections: a session carries about 20 requests
WRITING = {rawnbd.CMD_WRITE, rawnbd.CMD_TRIM, rawnbd.CMD_WRITE_ZEROES}
EXTENDED_REPLY_MAGIC = 0x6E8A278C
MAX_CHUNK = 64 << 20  # no chunk of a reply to requests of at most 32 MiB is longer


class Finding(Exception):
    """Something the server must never do."""


@dataclass
class Stats:
    mode: str
    seed: int
    inputs: int = 0
    handshakes: int = 0
    requests: int = 0
    sessions: int = 0
    probes: int = 0
    max_rss_kib: int = 0
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"mode={self.mode} seed={self.seed} inputs={self.inputs} "
            f"handshakes={self.handshakes} requests={self.requests} sessions={self.sessions} "
            f"probes={self.probes} max_rss_mib={self.max_rss_kib / 1024:.1f} "
            f"seconds={self.seconds:.1f} findings={len(self.findings)}"
        )


class Replies:
    """Frames the server's replies (simple and structured, or extended chunks once extended
    headers are negotiated: then nothing else) against what was sent."""

    def __init__(self, sent: dict[int, wire.Sent], readonly: bool, extended: bool) -> None:
        self.sent = sent
        self.readonly = readonly
        self.extended = extended
        self.open = set(sent)  # cookies not answered yet
        self.buf = bytearray()
        self.need_data = 0  # bytes of a simple READ reply's data still to come

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need_data:
                took = min(self.need_data, len(self.buf))
                del self.buf[:took]
                self.need_data -= took
                if self.need_data:
                    return
            if len(self.buf) < 4:
                return
            (magic,) = struct.unpack_from("!I", self.buf)
            if self.extended != (magic == EXTENDED_REPLY_MAGIC):
                negotiated = "with" if self.extended else "without"
                raise Finding(f"reply with magic {magic:#x} {negotiated} extended headers")
            if magic == rawnbd.SIMPLE_MAGIC:
                if len(self.buf) < 16:
                    return
                _m, error, cookie = struct.unpack_from("!IIQ", self.buf)
                del self.buf[:16]
                sent = self._answer(cookie, error, done=True)
                if sent.cmd == rawnbd.CMD_READ and not error:
                    self.need_data = sent.length
            elif magic == rawnbd.STRUCTURED_MAGIC:
                if len(self.buf) < 20:
                    return
                _m, flags, kind, cookie, length = struct.unpack_from("!IHHQI", self.buf)
                if not self._chunk(20, flags, kind, cookie, length):
                    return
            elif magic == EXTENDED_REPLY_MAGIC:
                if len(self.buf) < 32:
                    return
                _m, flags, kind, cookie, _offset, length = struct.unpack_from("!IHHQQQ", self.buf)
                if not self._chunk(32, flags, kind, cookie, length):
                    return
            else:
                raise Finding(f"reply with bad magic {magic:#x}")

    def _chunk(self, size: int, flags: int, kind: int, cookie: int, length: int) -> bool:
        """A structured or extended chunk of a ``size``-byte header; False: not all here."""
        if length > MAX_CHUNK:
            raise Finding(f"reply chunk of {length} bytes")
        if len(self.buf) < size + length:
            return False
        payload = bytes(self.buf[size : size + length])
        del self.buf[: size + length]
        error = struct.unpack_from("!I", payload)[0] if kind & 0x8000 and length >= 4 else 0
        if kind & 0x8000 and (length < 6 or not error):
            raise Finding(f"error chunk without an error: {payload[:16]!r}")
        self._answer(cookie, error, done=bool(flags & 1))
        return True

    def _answer(self, cookie: int, error: int, *, done: bool) -> wire.Sent:
        sent = self.sent.get(cookie)
        if sent is None or cookie not in self.open:
            raise Finding(f"reply for cookie {cookie} that is not in flight")
        if self.readonly and sent.cmd in WRITING and not error:
            raise Finding(f"command {sent.cmd} succeeded on a read-only export")
        if done:
            self.open.discard(cookie)
        return sent


def _exchange(
    sock: socket.socket,
    out: bytes,
    replies: Replies | None,
    *,
    stop: Callable[[], bool],
    shut_wr: bool,
) -> bool:
    """Send ``out`` while reading; until ``stop()`` or end of stream (True). ``shut_wr``:
    half-close once everything is sent. Finding on no progress for HANG seconds."""
    sock.setblocking(False)
    view = memoryview(out)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0))
    last = time.monotonic()
    half_closed = False
    try:
        while True:
            if not view and shut_wr and not half_closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                half_closed = True
            if stop():
                return False
            events = sel.select(1.0)
            if not events and time.monotonic() - last > HANG:
                raise Finding(f"no progress for {HANG:.0f}s")
            for _key, mask in events:
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except (ConnectionResetError, BrokenPipeError):
                        data = b""
                    except BlockingIOError:
                        continue
                    if not data:
                        return True
                    last = time.monotonic()
                    if replies is not None:
                        replies.feed(data)
                if mask & selectors.EVENT_WRITE and view:
                    try:
                        sent = sock.send(view)
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        view = view[len(view) :]  # the server closed: read what it said
                        sent = 0
                    view = view[sent:]
                    last = time.monotonic()
                    if not view:
                        sel.modify(sock, selectors.EVENT_READ)
    finally:
        sel.close()


def _connect(endpoint: Endpoint) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", endpoint.port), 10)
    sock.settimeout(10)
    greeting = b""
    while len(greeting) < 18:
        chunk = sock.recv(18 - len(greeting))
        if not chunk:
            raise Finding("server closed before its greeting")
        greeting += chunk
    if greeting[:8] != b"NBDMAGIC":
        raise Finding(f"bad greeting {greeting!r}")
    return sock, greeting


def run_handshake(rng: random.Random, endpoint: Endpoint) -> None:
    data = wire.handshake_input(rng, endpoint.target)
    sock, _greeting = _connect(endpoint)
    with sock:
        _exchange(sock, data, None, stop=lambda: False, shut_wr=True)


def _negotiate(sock: socket.socket, s: wire.Session) -> None:
    """Send the session's valid handshake and read its replies up to GO's ACK."""
    sock.sendall(s.handshake)
    buf = bytearray()
    while True:
        while len(buf) < 20:
            chunk = sock.recv(4096)
            if not chunk:
                raise Finding("server closed during a valid handshake")
            buf += chunk
        magic, opt, rep, length = struct.unpack_from("!QIII", buf)
        if magic != rawnbd.REPLY_MAGIC:
            raise Finding(f"bad option reply magic {magic:#x}")
        while len(buf) < 20 + length:
            chunk = sock.recv(4096)
            if not chunk:
                raise Finding("server closed during a valid handshake")
            buf += chunk
        del buf[: 20 + length]
        if rep & 0x80000000:
            raise Finding(f"valid option {opt} refused with {rep:#x}")
        if opt == 7 and rep == rawnbd.REP_ACK:
            if buf:
                raise Finding("bytes after GO's ACK")
            return


def run_session(rng: random.Random, endpoint: Endpoint, first_cookie: int) -> int:
    """One connection's requests; returns how many were sent."""
    s = wire.session(rng, endpoint.target, first_cookie)
    readonly = not endpoint.target.writable
    sock, _greeting = _connect(endpoint)
    with sock:
        _negotiate(sock, s)
        body = b"".join(s.requests)
        if s.ending == "sentinel":
            cookie = max(s.sent, default=first_cookie) + 1
            s.sent[cookie] = wire.Sent(rawnbd.CMD_READ, 1)
            body += wire.header(s.extended, 0, rawnbd.CMD_READ, cookie, 0, 1)
            replies = Replies(s.sent, readonly, s.extended)
            ended = _exchange(sock, body, replies, stop=lambda: not replies.open, shut_wr=False)
            if ended:
                raise Finding(
                    f"connection dropped with {len(replies.open)} well-framed requests unanswered"
                )
        elif s.ending == "close":
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.send(body)
        else:
            replies = Replies(s.sent, readonly, s.extended)
            _exchange(sock, body + s.tail, replies, stop=lambda: False, shut_wr=True)
    return len(s.requests)


def probe(rng: random.Random, endpoint: Endpoint) -> None:
    """A fresh, well-behaved client: write, flush, read back (read-only: read and compare)."""
    client = rawnbd.RawClient(endpoint.port, timeout=HANG)
    try:
        size, _flags = client.go(endpoint.target.name)
        if size != endpoint.target.size:
            raise Finding(f"export size {size}, expected {endpoint.target.size}")
        offset = rng.randrange(endpoint.target.size // 4096) * 4096
        if endpoint.content is None:
            data = rng.randbytes(4096)
            # one at a time: a FLUSH covers only writes already answered, and replies to
            # pipelined requests may come in any order
            for cmd, cookie, payload in ((rawnbd.CMD_WRITE, 1, data), (rawnbd.CMD_FLUSH, 2, b"")):
                client.request(
                    cmd, offset if payload else 0, len(payload), cookie=cookie, data=payload
                )
                error, got, _ = client.simple_reply()
                if error or got != cookie:
                    raise Finding(f"probe: request {cookie} got error {error}, cookie {got}")
        else:
            data = endpoint.content[offset : offset + 4096]
        client.request(rawnbd.CMD_READ, offset, 4096, cookie=3)
        error, _cookie, got_data = client.simple_reply(4096)
        if error or got_data != data:
            raise Finding(f"probe: read back at {offset} {'failed' if error else 'differs'}")
        client.request(rawnbd.CMD_DISC)
    except (OSError, rawnbd.Closed, AssertionError) as exc:
        raise Finding(f"probe failed: {exc!r}") from exc
    finally:
        client.close()


def check(rig_: Rig, stats: Stats, rng: random.Random) -> None:
    for pid in rig_.pids():
        if not os.path.exists(f"/proc/{pid}"):
            raise Finding(f"server process {pid} is gone")
    for guard in rig_.guards:
        broken = guard()
        if broken:
            raise Finding(f"guard: {broken}")
    for pid in rig_.pids():
        rss = rss_kib(pid)
        stats.max_rss_kib = max(stats.max_rss_kib, rss)
        if rss > RSS_BOUND_KIB:
            raise Finding(f"RSS of {pid}: {rss} KiB, above the bound of {RSS_BOUND_KIB} KiB")
    for endpoint in rig_.endpoints:
        probe(rng, endpoint)
    stats.probes += 1


def fuzz(
    mode: str,
    work: Path,
    *,
    inputs: int,
    seed: int,
    probe_every: int = 2000,
    seconds: float = 0.0,
    report: Callable[[str], None] = lambda _line: None,
) -> Stats:
    """Fuzz ``mode`` until ``inputs`` inputs (or ``seconds``, if given, whichever first).
    Findings stop the run (the first is what to debug); they are in ``Stats.findings``."""
    rng = random.Random(seed)
    stats = Stats(mode, seed)
    began = time.monotonic()
    next_probe = probe_every
    next_report = began + 60
    with rig(mode, work) as r:
        try:
            check(r, stats, rng)
            while stats.inputs < inputs and not (seconds and time.monotonic() - began > seconds):
                endpoint = rng.choice(r.endpoints)
                try:
                    if rng.random() < HANDSHAKE_SHARE:
                        run_handshake(rng, endpoint)
                        stats.handshakes += 1
                        stats.inputs += 1
                    else:
                        count = run_session(rng, endpoint, rng.randrange(1, 1 << 60))
                        stats.sessions += 1
                        stats.requests += count
                        stats.inputs += count
                except (TimeoutError, ConnectionRefusedError) as exc:
                    raise Finding(f"server unreachable: {exc!r}") from exc
                if stats.inputs >= next_probe:
                    check(r, stats, rng)
                    next_probe = stats.inputs + probe_every
                if time.monotonic() > next_report:
                    stats.seconds = time.monotonic() - began
                    report(stats.line())
                    next_report = time.monotonic() + 60
            check(r, stats, rng)
        except Finding as finding:
            stats.findings.append(f"{finding} (after {stats.inputs} inputs, seed {seed})")
            tail = r.logs()[-3000:]
            stats.findings.append(f"server log tail:\n{tail}")
    stats.seconds = time.monotonic() - began
    return stats
