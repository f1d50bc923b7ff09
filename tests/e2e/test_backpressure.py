"""Backpressure and memory bounds of a connection (issue 10), against a real ``xnbd-server
--target`` process over raw sockets.

1. a client with more requests (``-Q``) or bytes (``-B``) in flight than the limits must not hang
   its connection: every pipelined request is answered;
2. fio with deep queues runs and exits;
3. a client that stops reading and closes its socket frees the connection on the server;
4. WRITE payloads announced but not (yet) sent, and floods of WRITEs, cost bounded memory;
5. clients that read replies slowly do not make the server hold unbounded READ data.

A hang fails a test through socket timeouts (``STALL``: no progress at all for that long), never
by blocking for ever. Memory is the server's resident set (``VmRSS``; the peak through ``VmHWM``
after resetting it with ``/proc/PID/clear_refs``), one number for the whole process with all of
its threads. Images live in ``tmp_path`` (a disk file system: READ data goes through buffers in
the server) unless a test says otherwise; ``/dev/shm`` images are served with sendfile.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.rawnbd import CMD_READ, CMD_WRITE, EINVAL, SIMPLE_MAGIC, RawClient
from tests.serverproc import ServerProcess, running_server

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

STALL = 20.0  # seconds without any progress on a socket: the connection hangs
IDLE = 0.05  # a pause that lets the server settle with nothing to do (see ``connect``)
WARMUP_COOKIE = 2**63

# Memory ceilings above the server's resident set before the test's load, from the documented
# bound: --max-buf-size bytes for the whole daemon, plus one request of the maximum payload (32
# MiB here) that may run alone, plus 128 KiB of receive buffer per connection, plus slack for the
# allocator and the interpreter.
HEADERS_CEILING = 64 * MiB  # 40 connections x one 32 MiB WRITE header: 1280 MiB if allocated
FLOOD_CEILING = 8 * MiB + 32 * MiB + 64 * 128 * 1024 + 24 * MiB  # -B 8M, 64 connections
SLOW_READERS_BUF = 64 * MiB
SLOW_READERS_CEILING = SLOW_READERS_BUF + 32 * MiB + 32 * MiB


# -- images ---------------------------------------------------------------------------------------


def pattern(size: int) -> bytes:
    """Image contents where a READ from the wrong place shows: every 4 KiB block starts with
    its own number."""
    filler = random.Random(10).randbytes(4 * KiB - 8)
    return b"".join(struct.pack("<Q", block) + filler for block in range(size // (4 * KiB)))


def make_image(directory: Path, size: int, *, contents: bool = True) -> tuple[Path, bytes]:
    """An image of ``size`` bytes in ``directory``, with the ``pattern`` (or sparse: zeros)."""
    path = directory / f"backpressure-{uuid.uuid4().hex[:8]}.img"
    if contents:
        data = pattern(size)
        path.write_bytes(data)
    else:
        data = bytes(size)
        with open(path, "wb") as f:
            f.truncate(size)
    return path, data


@pytest.fixture(params=["disk", "shm"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the image lives: a disk file system (READ data through buffers) or tmpfs (large
    READs go out with sendfile: a different reply path)."""
    if request.param == "disk":
        yield tmp_path
        return
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    directory = shm / f"xnbdd-backpressure-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- clients --------------------------------------------------------------------------------------


def connect(srv: ServerProcess, *, idle: bool = True) -> RawClient:
    """A client negotiated with simple replies, its connection through one READ and then idle
    for a moment, as a real client's is between bursts. (On the server of issue 10 a connection
    hangs when its limits fill while its reply writer is asleep: a burst right after the
    handshake may slip past that by timing.)"""
    c = RawClient(srv.port, timeout=STALL)
    c.go()
    c.request(CMD_READ, 0, 512, cookie=WARMUP_COOKIE)
    error, cookie, _data = c.simple_reply(512)
    assert (error, cookie) == (0, WARMUP_COOKIE)
    if idle:
        time.sleep(IDLE)
    return c


def read_requests(reads: Mapping[int, tuple[int, int]]) -> bytes:
    """The headers of READs ``cookie -> (offset, length)``, in one piece to send at once."""
    return b"".join(
        RawClient.encode_request(CMD_READ, offset, length, cookie=cookie)
        for cookie, (offset, length) in reads.items()
    )


def replies(c: RawClient, lengths: Mapping[int, int]) -> Iterator[tuple[int, int, bytearray]]:
    """One simple reply per cookie of ``lengths`` (cookie -> bytes of data after a successful
    READ; 0 for other commands), in the order they come: ``(cookie, error, data)``. ``data`` is
    reused by the next reply of the same length. A reply that does not come within ``STALL``
    seconds fails the test, saying how far the connection got."""
    left = dict(lengths)
    buffers: dict[int, bytearray] = {}
    done = 0
    while left:
        try:
            magic, error, cookie = struct.unpack("!IIQ", c.recv(16))
            assert magic == SIMPLE_MAGIC, f"reply magic {magic:#x}: replies out of step"
            assert cookie in left, f"reply for cookie {cookie}: unknown or answered twice"
            length = left.pop(cookie)
            if error:
                length = 0  # no data after an error
            data = buffers.get(length)
            if data is None:
                data = buffers[length] = bytearray(length)
            if length:
                c.recv_into(memoryview(data))
        except TimeoutError:
            raise AssertionError(
                f"connection hangs: no progress for {STALL:.0f} s after {done} of "
                f"{len(lengths)} replies"
            ) from None
        done += 1
        yield cookie, error, data


def check_reads(c: RawClient, reads: Mapping[int, tuple[int, int]], image: bytes) -> None:
    """Every READ of ``reads`` is answered, successfully, with the image's data."""
    view = memoryview(image)
    for cookie, error, data in replies(c, {k: length for k, (_o, length) in reads.items()}):
        offset, length = reads[cookie]
        assert error == 0, f"READ {cookie} ({length} bytes at {offset}): error {error}"
        assert data == view[offset : offset + length], f"READ {cookie} at {offset}: wrong data"


class Sender:
    """Sends ``pieces`` on ``c`` from a thread, while the test reads replies."""

    def __init__(self, c: RawClient, pieces: list[bytes]) -> None:
        self.error: BaseException | None = None
        self.sent = 0
        self._thread = threading.Thread(target=self._run, args=(c, pieces), daemon=True)
        self._thread.start()

    def _run(self, c: RawClient, pieces: list[bytes]) -> None:
        try:
            for piece in pieces:
                c.send(piece)
                self.sent += 1
        except BaseException as err:
            self.error = err

    def finish(self) -> None:
        self._thread.join(STALL)
        assert not self._thread.is_alive(), f"still sending after {STALL:.0f} s"
        assert self.error is None, f"sending failed after {self.sent} pieces: {self.error!r}"


def run_threads(
    targets: list[Callable[[], None]], timeout: float, poll: Callable[[], None] | None = None
) -> None:
    """Run each target in a thread; the first failure (or a thread still running after
    ``timeout``) fails the test. ``poll`` is called every 10 ms meanwhile (it may fail too)."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline and not errors:
        if poll is not None:
            poll()
        time.sleep(0.01)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"clients still busy after {timeout:.0f} s"


# -- the server process ---------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KiB
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakRss:
    """The server's resident set: now, and its peak since ``reset``. The peak is the kernel's
    high-water mark (``VmHWM``, reset through ``clear_refs``), so short spikes between two looks
    count too; where ``clear_refs`` cannot be written, the peak of what ``peak`` saw."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = 0
        self._seen = 0
        self._hwm = True
        self.reset()

    def rss(self) -> int:
        return status_kib(self.pid, "VmRSS")

    def reset(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            self._hwm = False
        self.start = self._seen = self.rss()

    def peak(self) -> int:
        self._seen = max(self._seen, self.rss())
        return max(self._seen, status_kib(self.pid, "VmHWM")) if self._hwm else self._seen

    def watch(self, ceiling: int, *, quiet: float, limit: float) -> None:
        """Watch until the peak has not grown for ``quiet`` seconds (the server is done with
        what it was sent) or ``limit`` seconds passed; fails as soon as it is above ``start +
        ceiling``."""
        deadline = time.monotonic() + limit
        last, since = self.peak(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            self.assert_below(ceiling)
            time.sleep(0.01)
            if (now := self.peak()) != last:
                last, since = now, time.monotonic()
        self.assert_below(ceiling)

    def assert_below(self, ceiling: int) -> None:
        peak = self.peak()
        assert peak <= self.start + ceiling, (
            f"server RSS peaked at {peak / MiB:.0f} MiB: {(peak - self.start) / MiB:.0f} MiB "
            f"above its {self.start / MiB:.0f} MiB at the start, the ceiling is "
            f"{ceiling / MiB:.0f} MiB"
        )


def tcp_table(pid: int) -> list[tuple[int, int, int, int, int, int]]:
    """IPv4 TCP sockets of the server's network namespace: (local port, remote port, state,
    send queue, receive queue, inode)."""
    rows = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        tx, rx = (int(x, 16) for x in fields[4].split(":"))
        rows.append(
            (
                int(fields[1].split(":")[1], 16),
                int(fields[2].split(":")[1], 16),
                int(fields[3], 16),
                tx,
                rx,
                int(fields[9]),
            )
        )
    return rows


TCP_CLOSE_WAIT = 8


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets the process has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


# -- 1. more in flight than the limits --------------------------------------------------------


def pipelined_reads(
    image_dir: Path, tmp_path: Path, count: int, length: int, *options: str
) -> None:
    """``count`` READs of ``length`` bytes sent in one go, then every reply read and checked."""
    size = 16 * MiB
    path, image = make_image(image_dir, size)
    blocks = size // length
    reads = {i: ((i * 7919 % blocks) * length, length) for i in range(count)}
    with running_server("--target", str(path), *options, tmp_path=tmp_path) as srv:
        c = connect(srv)
        try:
            c.send(read_requests(reads))
            check_reads(c, reads, image)
        finally:
            c.close()


def test_600_pipelined_reads_with_default_limits(image_dir: Path, tmp_path: Path) -> None:
    pipelined_reads(image_dir, tmp_path, 600, 4 * KiB)  # -Q 256


def test_600_pipelined_reads_with_queue_16(tmp_path: Path) -> None:
    pipelined_reads(tmp_path, tmp_path, 600, 4 * KiB, "-Q", "16")


def test_1_mib_reads_beyond_the_byte_limit(image_dir: Path, tmp_path: Path) -> None:
    pipelined_reads(image_dir, tmp_path, 16, MiB, "--max-buf-size", str(8 * MiB))


@pytest.mark.parametrize("length", [4 * KiB, 1 * KiB], ids=["4k", "1k"])
def test_600_pipelined_writes_with_queue_16(image_dir: Path, tmp_path: Path, length: int) -> None:
    """600 WRITEs sent in one go, with their payloads, each answered and written. (The issue 10
    server hangs only with 1 KiB WRITEs on tmpfs: it answers those inline, and 62 of them come
    in one of its 64 KiB socket reads, more than -Q 16; it reads 4 KiB WRITEs 15 at a time, and
    on a disk file system it writes in worker threads, whose replies wake its writer.)"""
    size = 4 * MiB
    path, _zeros = make_image(image_dir, size, contents=False)
    new = pattern(size)
    writes = {i: (i * length, length) for i in range(600)}  # each byte once
    burst = b"".join(
        RawClient.encode_request(CMD_WRITE, offset, length, cookie=cookie)
        + new[offset : offset + length]
        for cookie, (offset, length) in writes.items()
    )
    with running_server("--target", str(path), "-Q", "16", tmp_path=tmp_path) as srv:
        c = connect(srv)
        try:
            # Up to 2.4 MB: maybe more than the socket buffers take. Send from a thread.
            sender = Sender(c, [burst])
            for cookie, error, _data in replies(c, dict.fromkeys(writes, 0)):
                assert error == 0, f"WRITE {cookie}: error {error}"
            sender.finish()
        finally:
            c.close()
    written = path.read_bytes()
    assert written[: 600 * length] == new[: 600 * length]
    assert written[600 * length :] == bytes(size - 600 * length)


def test_read_beyond_the_payload_limit_behind_a_small_read(tmp_path: Path) -> None:
    """A 2 GiB READ costs more than any byte limit and is invalid anyway (the maximum payload
    is 32 MiB): it gets EINVAL, and the small READ before it its data."""
    path, image = make_image(tmp_path, 4 * MiB)
    with running_server("--target", str(path), tmp_path=tmp_path) as srv:
        c = connect(srv)
        try:
            c.send(
                RawClient.encode_request(CMD_READ, 4096, 512, cookie=1)
                + RawClient.encode_request(CMD_READ, 0, 0x80000000, cookie=2)
            )
            answers = {
                cookie: (error, bytes(data)) for cookie, error, data in replies(c, {1: 512, 2: 0})
            }
        finally:
            c.close()
    assert answers[1] == (0, image[4096 : 4096 + 512])
    assert answers[2] == (EINVAL, b"")


def test_streaming_20000_reads_while_reading_replies(tmp_path: Path) -> None:
    """One thread sends 20,000 READs, as fast as the server takes them; the test reads the
    replies at the same time."""
    size = 16 * MiB
    path, image = make_image(tmp_path, size)
    reads = {i: ((i * 7919 % (size // (4 * KiB))) * 4 * KiB, 4 * KiB) for i in range(20_000)}
    with running_server("--target", str(path), tmp_path=tmp_path) as srv:
        c = connect(srv)
        items = list(reads.items())
        chunks = [read_requests(dict(items[i : i + 1000])) for i in range(0, len(items), 1000)]
        try:
            begin = time.monotonic()
            sender = Sender(c, chunks)
            check_reads(c, reads, image)
            sender.finish()
            assert time.monotonic() - begin < 60
        finally:
            c.close()


def test_half_close_after_600_reads_gets_every_reply_then_eof(tmp_path: Path) -> None:
    size = 16 * MiB
    path, image = make_image(tmp_path, size)
    reads = {i: ((i * 7919 % (size // (4 * KiB))) * 4 * KiB, 4 * KiB) for i in range(600)}
    with running_server("--target", str(path), tmp_path=tmp_path) as srv:
        c = connect(srv)
        try:
            c.send(read_requests(reads))
            c.sock.shutdown(socket.SHUT_WR)
            check_reads(c, reads, image)
            assert c.at_eof(timeout=STALL), "the server sent more than the replies"
        finally:
            c.close()


# -- 2. fio with deep queues ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iodepth", "options"), [(300, ()), (32, ("-Q", "16"))], ids=["qd300-default", "qd32-Q16"]
)
def test_fio_deeper_than_the_queue_limit(
    tmp_path: Path, iodepth: int, options: tuple[str, ...]
) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    path, _zeros = make_image(tmp_path, 64 * MiB)
    with running_server("--target", str(path), *options, tmp_path=tmp_path) as srv:
        command = [
            "fio",
            "--name=deep",
            "--ioengine=nbd",
            f"--uri={srv.uri}",
            "--rw=randread",
            "--bs=4k",
            f"--iodepth={iodepth}",
            "--size=64M",
            "--time_based",
            "--runtime=2",
            "--output-format=json",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fio --iodepth={iodepth} still running after 30 s (runtime 2 s): hangs")
    assert done.returncode == 0, f"fio failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["total_ios"] > 0


# -- 3. a stalled client that closes ------------------------------------------------------------


def test_closing_a_stalled_connection_frees_it_on_the_server(tmp_path: Path) -> None:
    """A client pipelines 2,000 64 KiB READs, never reads a reply, and closes its socket: the
    server closes its side (no socket left open, none in CLOSE-WAIT) and serves others."""
    path, image = make_image(tmp_path, 16 * MiB)
    reads = {i: ((i % 256) * 64 * KiB, 64 * KiB) for i in range(2000)}
    with running_server("--target", str(path), tmp_path=tmp_path) as srv:
        pid = srv.proc.pid
        c = connect(srv)
        client_port = c.sock.getsockname()[1]
        (inode,) = [
            row[5] for row in tcp_table(pid) if row[:2] == (srv.port, client_port) and row[5]
        ]
        assert inode in socket_inodes(pid)

        def queues() -> list[tuple[int, int]]:
            ends = ((srv.port, client_port), (client_port, srv.port))
            return [(row[3], row[4]) for row in tcp_table(pid) if row[:2] in ends]

        c.send(read_requests(reads))
        # Stalled: the server sent what the sockets take (or nothing) and nothing moves.
        deadline = time.monotonic() + 5
        last, since = queues(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < 0.5:
            time.sleep(0.02)
            if (now := queues()) != last:
                last, since = now, time.monotonic()
        c.close()

        def close_wait(open_inodes: set[int]) -> list[tuple[int, int, int, int, int, int]]:
            return [r for r in tcp_table(pid) if r[2] == TCP_CLOSE_WAIT and r[5] in open_inodes]

        deadline = time.monotonic() + 10
        open_inodes = socket_inodes(pid)
        while (inode in open_inodes or close_wait(open_inodes)) and time.monotonic() < deadline:
            time.sleep(0.05)
            open_inodes = socket_inodes(pid)
        state = [row[2] for row in tcp_table(pid) if row[5] == inode]
        assert inode not in open_inodes, (
            f"10 s after the client closed, the server still has the connection's socket open "
            f"(TCP state {state or 'closed'}; 8 is CLOSE-WAIT)"
        )
        assert not close_wait(open_inodes), f"in CLOSE-WAIT: {close_wait(open_inodes)}"

        other = connect(srv, idle=False)
        try:
            other.send(read_requests({1: (12 * MiB, 64 * KiB)}))
            check_reads(other, {1: (12 * MiB, 64 * KiB)}, image)
        finally:
            other.close()


# -- 4. memory: WRITE payloads ----------------------------------------------------------------


def connect_many(srv: ServerProcess, stack: ExitStack, count: int) -> list[RawClient]:
    """``count`` negotiated clients, closed when ``stack`` unwinds."""
    clients = []
    for _ in range(count):
        c = connect(srv, idle=False)
        stack.callback(c.close)
        clients.append(c)
    return clients


def test_write_headers_without_payload_do_not_reserve_memory(tmp_path: Path) -> None:
    """40 connections each announce a 32 MiB WRITE and send none of it (and stay open): the
    server must not hold 40 x 32 MiB for payloads that may never come."""
    path, _zeros = make_image(tmp_path, 64 * MiB, contents=False)
    with running_server("--target", str(path), tmp_path=tmp_path) as srv, ExitStack() as stack:
        clients = []
        for _ in range(40):
            c = connect(srv, idle=False)
            stack.callback(c.close)
            clients.append(c)
        memory = PeakRss(srv.proc.pid)
        for c in clients:
            c.send(RawClient.encode_request(CMD_WRITE, 0, 32 * MiB, cookie=1))
            memory.assert_below(HEADERS_CEILING)  # fail before the next 32 MiB, if allocated
        probe = connect(srv, idle=False)  # the server went round its loop since the headers
        probe.close()
        memory.watch(HEADERS_CEILING, quiet=0.5, limit=2)

        payload = random.Random(4).randbytes(32 * MiB)
        clients[0].send(payload)  # a payload that does come is taken and written
        for cookie, error, _data in replies(clients[0], {1: 0}):
            assert (cookie, error) == (1, 0)
    assert path.read_bytes()[: 32 * MiB] == payload


def test_64_clients_flooding_1_mib_writes_stay_bounded(tmp_path: Path) -> None:
    """64 clients each send 16 1 MiB WRITEs in one go and read no reply until all are sent;
    ``--max-buf-size 8M``. The server's memory stays bounded, and every WRITE is answered."""
    clients_count, writes_each = 64, 16
    path, _zeros = make_image(tmp_path, clients_count * MiB, contents=False)
    with (
        running_server(
            "--target", str(path), "--max-buf-size", str(8 * MiB), tmp_path=tmp_path
        ) as srv,
        ExitStack() as stack,
    ):
        clients = connect_many(srv, stack, clients_count)
        time.sleep(IDLE)
        memory = PeakRss(srv.proc.pid)

        def flood(k: int) -> Callable[[], None]:
            def run() -> None:
                c = clients[k]
                payload = bytes([k + 1]) * MiB
                for cookie in range(writes_each):
                    try:
                        c.send(RawClient.encode_request(CMD_WRITE, k * MiB, MiB, cookie=cookie))
                        c.send(payload)
                    except TimeoutError:
                        raise AssertionError(
                            f"client {k}: WRITE {cookie} not taken for {STALL:.0f} s: the "
                            "server stopped reading the connection"
                        ) from None
                for cookie, error, _data in replies(c, dict.fromkeys(range(writes_each), 0)):
                    assert error == 0, f"client {k}, WRITE {cookie}: error {error}"

            return run

        run_threads(
            [flood(k) for k in range(clients_count)],
            timeout=3 * STALL,
            poll=lambda: memory.assert_below(FLOOD_CEILING),
        )
        memory.assert_below(FLOOD_CEILING)
    written = path.read_bytes()
    for k in range(clients_count):
        assert written[k * MiB : (k + 1) * MiB] == bytes([k + 1]) * MiB, f"client {k}"


# -- 5. memory: READ data for slow readers ----------------------------------------------------


def test_slow_readers_of_large_reads_stay_bounded(tmp_path: Path) -> None:
    """4 clients each pipeline 16 READs of 32 MiB (8 x ``--max-buf-size 64M`` between them) and
    read nothing: the server must not hold their data in memory meanwhile. Then they read it
    all.
    (16 rather than 64 READs per client: the same pressure, a quarter of the 8 GiB to check.)"""
    clients_count, reads_each, length = 4, 16, 32 * MiB
    size = 4 * length
    path, image = make_image(tmp_path, size)  # on disk: READ data goes through buffers
    reads = {j: ((j % 4) * length, length) for j in range(reads_each)}
    with (
        running_server(
            "--target", str(path), "--max-buf-size", str(SLOW_READERS_BUF), tmp_path=tmp_path
        ) as srv,
        ExitStack() as stack,
    ):
        clients = connect_many(srv, stack, clients_count)
        time.sleep(IDLE)
        memory = PeakRss(srv.proc.pid)
        for c in clients:
            c.send(read_requests(reads))
        memory.watch(SLOW_READERS_CEILING, quiet=0.5, limit=3)

        def read_all(c: RawClient) -> Callable[[], None]:
            return lambda: check_reads(c, reads, image)

        run_threads([read_all(c) for c in clients], timeout=6 * STALL)
