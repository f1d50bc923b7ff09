"""The data plane (``xnbdd/dataplane.py``) over a real socket pair.

``Connection.serve(negotiated)`` skips the handshake and runs the production transmission path:
the plane's thread owns the server end of a unix socket pair, answers at once what the backend
can answer without waiting (tmpfs: sendfile for large READs; a disk image: the page cache through
RWF_NOWAIT) and hands the rest to the event loop. The client end is driven here byte by byte with
its own encoder and decoder (spec numbers only), so framing, flow control, the export's pause gate
and the daemon-wide byte budget (``xnbdd/budget.py``) are checked as a client sees them.

Nothing here waits on a sleep for a condition that can be polled (``wait_until``); every client
operation has a timeout, and a connection whose plane never ends is cut when its test ends (the
cancelled connection aborts its plane), so a hang fails a test instead of stopping the run.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import random
import select
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_connection import OneExport, socket_pair, wait_until
from xnbdd import connection as connection_module
from xnbdd.backends.base import Backend, FileRange, PipedPayload
from xnbdd.backends.bitmap import BLOCK_SIZE, SharedBitmap
from xnbdd.backends.cow import CowBackend
from xnbdd.backends.file import SENDFILE_MIN, FileBackend
from xnbdd.budget import ByteBudget, Grant, Limits
from xnbdd.connection import Connection, ServerState
from xnbdd.dataplane import DIRECT_PAYLOAD, HOLE_CHECK_MIN, DataPlane
from xnbdd.export import Export
from xnbdd.proto import consts
from xnbdd.proto.consts import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
)
from xnbdd.proto.messages import Negotiated, transmission_flags
from xnbdd.proto.transmission import DRAIN_LIMIT

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 10.0  # any single client operation; far above what a healthy one takes
ENDS_WITHIN = 2.0  # a connection that should close has closed by then

# The largest payload the server takes: the advertised maximum, or more where the code accepts
# more from clients that ignore it (MAX_ACCEPTED_PAYLOAD); a WRITE above it is refused, drained.
ACCEPTED = consts.MAX_ACCEPTED_PAYLOAD
# What one connection may always hold, however small --max-buf-size is (budget.py).
FLOOR = Limits(max_bytes=0).max_bytes_per_connection
U = 8 * MiB  # the READ size of the budget tests

REQUEST = struct.Struct("!IHHQQI")  # the client's own encoder: spec layout, not xnbdd's
EXT_REQUEST = struct.Struct("!IHHQQQ")  # extended headers: 64-bit length
SIMPLE_REST = struct.Struct("!IQ")  # error, cookie (after the magic)
CHUNK_REST = struct.Struct("!HHQI")  # flags, type, cookie, length (after the magic)
EXT_REST = struct.Struct("!HHQQQ")  # flags, type, cookie, offset, length (after the magic)

OFFSET_DATA, OFFSET_HOLE = int(ReplyType.OFFSET_DATA), int(ReplyType.OFFSET_HOLE)
NONE_CHUNK, ERROR_CHUNK = int(ReplyType.NONE), int(ReplyType.ERROR)


# -- the client end -------------------------------------------------------------------------------


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""
    simple: bool = True
    chunks: list[int] = field(default_factory=list)  # structured: chunk types in order
    message: str = ""
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # context: extents


class Client:
    """Encodes requests and decodes simple and structured replies on the client end; with
    ``extended`` 32-byte requests and extended replies (each checked to echo its request's
    offset)."""

    def __init__(self, stream: trio.SocketStream, *, extended: bool = False) -> None:
        self.stream = stream
        self.extended = extended
        self.buf = bytearray()
        self.reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length) of a READ
        self.offsets: dict[int, int] = {}  # cookie -> request offset (extended)

    def request(
        self, cmd: int, cookie: int, offset: int = 0, length: int = 0, *, flags: int = 0
    ) -> bytes:
        """One request header (a WRITE's payload is sent by the caller)."""
        if cmd == Cmd.READ:
            self.reads[cookie] = (offset, length)
        if self.extended:
            self.offsets[cookie] = offset
            return EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def write(self, cookie: int, offset: int, data: bytes) -> bytes:
        flags = int(CmdFlag.PAYLOAD_LEN) if self.extended else 0
        return self.request(Cmd.WRITE, cookie, offset, len(data), flags=flags) + data

    async def chunk_head(self, magic: int) -> tuple[int, int, int, int]:
        """flags, type, cookie, length of a structured or extended chunk (after its magic)."""
        if self.extended:
            assert magic == EXTENDED_REPLY_MAGIC, f"bad extended reply magic {magic:#x}"
            flags, kind, cookie, offset, length = EXT_REST.unpack(await self.take(EXT_REST.size))
            assert offset == self.offsets[cookie], "an extended reply echoes the request offset"
            return flags, kind, cookie, length
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, kind, cookie, length = CHUNK_REST.unpack(await self.take(CHUNK_REST.size))
        return flags, kind, cookie, length

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        with trio.fail_after(TIMEOUT):
            for part in parts:
                await self.stream.send_all(part)

    async def take(self, count: int) -> bytes:
        with trio.fail_after(TIMEOUT):
            while len(self.buf) < count:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    raise EOFError(f"closed with {len(self.buf)} of {count} bytes")
                self.buf += chunk
        out = bytes(self.buf[:count])
        del self.buf[:count]
        return out

    async def reply(self) -> Reply:
        (magic,) = struct.unpack("!I", await self.take(4))
        if magic == SIMPLE_REPLY_MAGIC and not self.extended:
            error, cookie = SIMPLE_REST.unpack(await self.take(SIMPLE_REST.size))
            _offset, length = self.reads.pop(cookie, (0, 0))
            return Reply(cookie, error, await self.take(length) if not error else b"")
        flags, kind, cookie, length = await self.chunk_head(magic)
        start, total = self.reads.pop(cookie, (0, 0))
        # READ data, allocated when the first content chunk comes (a refused READ may be huge)
        data = bytearray()
        reply = Reply(cookie, simple=False)
        while True:
            body = await self.take(length)
            reply.chunks.append(kind)
            if kind in (OFFSET_DATA, OFFSET_HOLE) and not data:
                data = bytearray(total)
            if kind == OFFSET_DATA:
                (offset,) = struct.unpack_from("!Q", body)
                assert start <= offset and offset + len(body) - 8 <= start + total
                data[offset - start : offset - start + len(body) - 8] = body[8:]
            elif kind == OFFSET_HOLE:
                offset, size = struct.unpack("!QI", body)
                assert start <= offset and offset + size <= start + total
                data[offset - start : offset - start + size] = bytes(size)
            elif kind in (ERROR_CHUNK, int(ReplyType.ERROR_OFFSET)):
                reply.error, text = struct.unpack_from("!IH", body)
                reply.message = body[6 : 6 + text].decode()
            elif kind == ReplyType.BLOCK_STATUS_EXT and self.extended:
                context, count = struct.unpack_from("!II", body)
                assert count and len(body) == 8 + 16 * count
                reply.status[context] = list(struct.iter_unpack("!QQ", body[8:]))
            elif kind == ReplyType.BLOCK_STATUS and not self.extended:
                (context,) = struct.unpack_from("!I", body)
                reply.status[context] = list(struct.iter_unpack("!II", body[4:]))
            else:
                assert kind == NONE_CHUNK, f"unexpected chunk type {kind:#x}"
            if flags & ReplyFlag.DONE:
                break
            (magic,) = struct.unpack("!I", await self.take(4))
            flags, kind, next_cookie, length = await self.chunk_head(magic)
            assert next_cookie == cookie
        reply.data = bytes(data) if not reply.error else b""
        assert reply.error or len(reply.data) == total, "content chunks cover the READ"
        return reply

    async def replies(self, count: int) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for _ in range(count):
            reply = await self.reply()
            assert reply.cookie not in out, f"two replies for cookie {reply.cookie}"
            out[reply.cookie] = reply
        return out

    async def closed(self) -> None:
        """The server closed the connection, with nothing more sent."""
        with trio.fail_after(TIMEOUT):
            chunk = await self.stream.receive_some(1 << 16)
        assert not self.buf and chunk == b"", f"{len(self.buf) + len(chunk)} bytes after the end"

    def holds_nothing(self) -> bool:
        """Nothing has been sent to the client (checked without waiting)."""
        ready, _w, _x = select.select([self.stream.socket.fileno()], [], [], 0)
        return not ready and not self.buf


# -- the server end -------------------------------------------------------------------------------


class Session:
    """One connection served in the background: its client end and how ``serve`` ended."""

    def __init__(self, client: Client, conn: Connection, state: ServerState) -> None:
        self.client = client
        self.conn = conn
        self.state = state
        self.finished = trio.Event()
        self.error: Exception | None = None

    async def run(self, negotiated: Negotiated) -> None:
        try:
            await self.conn.serve(negotiated)
        except Exception as exc:  # reported by ``ended``
            self.error = exc
        finally:
            self.finished.set()

    async def ended(self, timeout: float = ENDS_WITHIN) -> None:
        """``serve`` returned by itself, without an exception."""
        with trio.move_on_after(timeout):
            await self.finished.wait()
        assert self.finished.is_set(), f"serve did not return within {timeout} s"
        assert self.error is None, f"serve raised {self.error!r}"


def negotiated_for(
    export: Export, structured: bool, extended: bool = False, contexts: Sequence[str] = ()
) -> Negotiated:
    """What a handshake would have agreed on; ``contexts`` get the ids 1, 2, ..."""
    info = export.info()
    selected = dict(enumerate(contexts, 1))
    structured = structured or extended
    tx = transmission_flags(
        info.tx_flags, structured=structured, extended=extended, contexts=bool(selected)
    )
    return Negotiated(info, tx, structured, selected, extended)


@asynccontextmanager
async def serving(
    export: Export,
    *,
    structured: bool = False,
    extended: bool = False,
    contexts: Sequence[str] = (),
    state: ServerState | None = None,
    pair: Callable[[], tuple[trio.SocketStream, trio.SocketStream]] = socket_pair,
) -> AsyncIterator[Session]:
    """Serve ``export`` on one end of a socket pair (``pair``: client and server ends, a unix
    socket pair by default); the session's client has the other end. Leaving cancels the
    connection (its plane is aborted if it still runs)."""
    client_end, server_end = pair()
    state = state if state is not None else ServerState()
    conn = Connection(server_end, OneExport(export), state)
    session = Session(Client(client_end, extended=extended), conn, state)
    negotiated = negotiated_for(export, structured, extended, contexts)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, negotiated)
            try:
                yield session
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await client_end.aclose()


async def budget_returns(state: ServerState) -> None:
    """Every request's bytes and count are given back to the daemon's budget."""
    budget = state.budget
    await wait_until(lambda: budget.used == 0 and budget.requests == 0)


# -- images and backends --------------------------------------------------------------------------


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private directory on tmpfs (/dev/shm): the backend answers inline, with sendfile."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="xnbdd-test-dataplane-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["shm", "disk"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A directory on tmpfs, then one on disk (``tmp_path``): the test runs for both."""
    if request.param == "shm":
        path: Path = request.getfixturevalue("shm")
        return path
    return tmp_path


def on_tmpfs(path: Path) -> bool:
    return str(path).startswith("/dev/shm/")


def make_image(path: Path, size: int, *, seed: int | None, data_size: int | None = None) -> bytes:
    """An image of ``size`` bytes: random from ``seed`` over its first ``data_size`` bytes (all
    of it by default), a hole after that (everything without a seed). Returns its contents."""
    data = b""
    if seed is not None:
        data = random.Random(seed).randbytes(size if data_size is None else data_size)
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return data + bytes(size - len(data))


def resident_pages(path: Path) -> int:
    """Pages of the file in the page cache (mincore over a mapping: looking loads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            if libc.mincore(address, size, vec):
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def drop_page_cache(path: Path) -> None:
    """Write back and evict the file's cached pages: reads must come from the disk again.
    Eviction is best effort (a page another CPU still holds in a batch stays), so this waits
    until mincore sees none resident, not just asks once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(200):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not resident_pages(path):
                return
            time.sleep(0.01)
    finally:
        os.close(fd)
    pytest.fail(f"the kernel kept {resident_pages(path)} pages of {path} cached")


def nowait_reads_supported(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as err:
        return err.errno == errno.EAGAIN
    finally:
        os.close(fd)
    return True


def _kind(data: object) -> str:
    if data is None:
        return "declined"
    return "range" if isinstance(data, FileRange) else "data"


class CountingFile(FileBackend):
    """A file backend that records which path served each request."""

    def __init__(self, fd: int, path: str, *, readonly: bool) -> None:
        super().__init__(fd, path, readonly=readonly)
        self.inline_reads: list[str] = []  # per try_read: "range", "data" or "declined"
        self.async_reads = 0
        self.async_writes = 0
        self.piped_writes = 0  # large WRITEs written from the connection's pipe
        self.calls_while_paused = 0
        self.paused = False  # set by a test while it holds the export paused

    def _called(self) -> None:
        if self.paused:
            self.calls_while_paused += 1

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        self._called()
        data = super().try_read(offset, length)
        self.inline_reads.append(_kind(data))
        return data

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._called()
        self.async_reads += 1
        return await super().read(offset, length)

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        self._called()
        return super().try_write(offset, data)

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        self._called()
        done = super().try_write_piped(offset, length, payload)
        self.piped_writes += done
        return done

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self._called()
        self.async_writes += 1
        await super().write(offset, data, fua)


class CountingCow(CowBackend):
    """A cow-target backend that records which path served each request."""

    def __init__(
        self, base: FileBackend, overlay: FileBackend, bitmap: SharedBitmap, overlay_path: str
    ) -> None:
        super().__init__(base, overlay, bitmap, overlay_path)
        self.inline_reads: list[str] = []
        self.inline_writes = 0  # writes accepted by the plane's thread
        self.piped_writes = 0  # large ones from the connection's pipes
        self.async_reads = 0
        self.async_writes = 0

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        data = super().try_read(offset, length)
        self.inline_reads.append(_kind(data))
        return data

    async def read(self, offset: int, length: int) -> bytearray:
        self.async_reads += 1
        return await super().read(offset, length)

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        done = super().try_write(offset, data)
        self.inline_writes += done
        return done

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        done = super().try_write_piped(offset, length, payload)
        self.piped_writes += done
        return done

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self.async_writes += 1
        await super().write(offset, data, fua)


@asynccontextmanager
async def exported(backend: Backend) -> AsyncIterator[Export]:
    try:
        yield Export("disk", backend)
    finally:
        await backend.close()


def file_export(path: Path) -> AbstractAsyncContextManager[Export]:
    """An export of the image at ``path`` through a ``CountingFile`` (see ``counts``)."""
    return exported(CountingFile.open(str(path), readonly=False))


def counts(export: Export) -> CountingFile:
    assert isinstance(export.backend, CountingFile)
    return export.backend


def read_file(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pieces(length: int) -> Iterator[int]:
    """Piece sizes adding up to ``length``: single bytes first, then growing, then 1 MiB."""
    done = 0
    for size in itertools.chain(
        [1, 1, 2, 5, 27, 100, 1000, 4000, 30000, 100000], itertools.repeat(MiB)
    ):
        if done >= length:
            return
        size = min(size, length - done)
        yield size
        done += size


@pytest.fixture
def planes(monkeypatch: pytest.MonkeyPatch) -> list[DataPlane]:
    """The data planes that connections start from now on, to watch their state."""
    made: list[DataPlane] = []

    class Recorded(DataPlane):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(connection_module, "DataPlane", Recorded)
    return made


# -- replies, inline READs -----------------------------------------------------------------------

STRUCTURED = pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])


@STRUCTURED
async def test_tmpfs_reads_are_inline_and_large_ones_go_out_with_sendfile(
    shm: Path, structured: bool
) -> None:
    size = 4 * MiB
    model = bytearray(make_image(shm / "disk.img", size, seed=1))
    async with file_export(shm / "disk.img") as export, serving(export, structured=structured) as s:
        backend = counts(export)
        c = s.client
        ranges = [(0, 512), (4095, 2), (MiB - 7, 4096), (5, SENDFILE_MIN - 1)]
        ranges += [(SENDFILE_MIN, SENDFILE_MIN), (3, 3 * MiB), (size - MiB, MiB)]
        await c.send(*(c.request(Cmd.READ, i, off, n) for i, (off, n) in enumerate(ranges)))
        got = await c.replies(len(ranges))
        for i, (off, n) in enumerate(ranges):
            assert got[i].error == 0 and got[i].data == model[off : off + n], i
            assert got[i].simple is not structured
            if structured:
                assert got[i].chunks == [OFFSET_DATA]
        assert backend.async_reads == 0  # all of them answered by the plane's thread
        expected = ["data" if n < SENDFILE_MIN else "range" for _o, n in ranges]
        assert backend.inline_reads == expected

        # WRITEs (small and large) answered with simple replies in both modes, then read back
        small, large = os.urandom(1000), os.urandom(200 * KiB + 3)
        model[100:1100] = small
        model[2 * MiB + 5 : 2 * MiB + 5 + len(large)] = large
        await c.send(c.write(10, 100, small), c.write(11, 2 * MiB + 5, large))
        await c.send(c.request(Cmd.READ, 12, 0, 3 * MiB))
        got = await c.replies(3)
        assert got[10] == Reply(10) and got[11] == Reply(11)
        assert got[12].data == model[: 3 * MiB]
        assert read_file(shm / "disk.img", 0, size) == model

        # errors and empty reads
        await c.send(
            c.request(Cmd.READ, 20, size - 10, 11),  # beyond the end: EINVAL
            c.write(21, size - 1, b"xy"),  # beyond the end: ENOSPC
            c.request(Cmd.READ, 22, 7, 0),  # empty
            c.request(Cmd.READ, 23, 0, 16, flags=0x40),  # unknown flag: EINVAL
        )
        got = await c.replies(4)
        assert got[20].error == Errno.EINVAL and got[21].error == Errno.ENOSPC
        assert got[22].error == 0 and got[22].data == b""
        assert got[23].error == Errno.EINVAL
        if structured:
            assert got[20].chunks == [ERROR_CHUNK] and got[20].message
            assert got[21].chunks == [ERROR_CHUNK] and got[22].chunks == [NONE_CHUNK]
        await budget_returns(s.state)


async def test_structured_reads_of_holes_and_with_df(shm: Path) -> None:
    """Large structured READs of a tmpfs hole are one OFFSET_HOLE chunk; small ones and those
    over data are OFFSET_DATA; DF (don't fragment) is accepted inline."""
    size = 2 * MiB
    model = make_image(shm / "disk.img", size, seed=2, data_size=MiB)  # a hole after 1 MiB
    async with file_export(shm / "disk.img") as export, serving(export, structured=True) as s:
        backend = counts(export)
        c = s.client
        df = int(CmdFlag.DF)
        await c.send(
            c.request(Cmd.READ, 1, MiB, HOLE_CHECK_MIN),  # all hole
            c.request(Cmd.READ, 2, MiB + 4096, 4096),  # a hole, but small
            c.request(Cmd.READ, 3, MiB - 4096, HOLE_CHECK_MIN),  # data then hole
            c.request(Cmd.READ, 4, 0, MiB, flags=df),
            c.request(Cmd.READ, 5, MiB, MiB, flags=df),
        )
        got = await c.replies(5)
        for cookie, (offset, length) in {
            1: (MiB, HOLE_CHECK_MIN),
            2: (MiB + 4096, 4096),
            3: (MiB - 4096, HOLE_CHECK_MIN),
            4: (0, MiB),
            5: (MiB, MiB),
        }.items():
            assert got[cookie].error == 0
            assert got[cookie].data == model[offset : offset + length], cookie
        assert got[1].chunks == [OFFSET_HOLE] and got[5].chunks == [OFFSET_HOLE]
        assert got[2].chunks == got[3].chunks == got[4].chunks == [OFFSET_DATA]
        assert backend.async_reads == 0
        await budget_returns(s.state)


@STRUCTURED
async def test_disk_reads_go_async_when_uncached_then_inline_from_the_page_cache(
    tmp_path: Path, structured: bool
) -> None:
    path = tmp_path / "disk.img"
    size = 2 * MiB
    model = make_image(path, size, seed=3)
    drop_page_cache(path)
    ranges = [(0, 256 * KiB), (MiB + 3, 5000)]
    async with file_export(path) as export, serving(export, structured=structured) as s:
        backend = counts(export)
        c = s.client
        for round_ in (0, 1):
            await c.send(*(c.request(Cmd.READ, i, off, n) for i, (off, n) in enumerate(ranges)))
            got = await c.replies(len(ranges))
            for i, (off, n) in enumerate(ranges):
                assert got[i].error == 0 and got[i].data == model[off : off + n], (round_, i)
                if structured:
                    assert got[i].chunks == [OFFSET_DATA]
            if round_ == 0:  # not in memory: the event loop read them from the disk
                assert backend.inline_reads == ["declined", "declined"]
                assert backend.async_reads == 2
        if nowait_reads_supported(path):  # now cached: the plane's thread answered them
            assert backend.inline_reads[2:] == ["data", "data"]
            assert backend.async_reads == 2
        await budget_returns(s.state)


# -- WRITE payloads in pieces ---------------------------------------------------------------------


async def test_sequential_large_writes_of_one_size_each_land_whole(shm: Path) -> None:
    """Sixteen pipelined 1 MiB WRITEs of different contents (the connection reuses the buffer
    of a finished payload for the next one of the same size): each lands with its own data."""
    path = shm / "disk.img"
    make_image(path, 16 * MiB, seed=None)
    blobs = [random.Random(i).randbytes(MiB) for i in range(16)]
    async with file_export(path) as export, serving(export) as s:
        c = s.client
        await c.send(*(c.write(i, i * MiB, blob) for i, blob in enumerate(blobs)))
        assert {r.error for r in (await c.replies(16)).values()} == {0}
        await budget_returns(s.state)
    assert read_file(path, 0, 16 * MiB) == b"".join(blobs)


@pytest.mark.parametrize(
    "length", [1, 1000, DIRECT_PAYLOAD - 1, DIRECT_PAYLOAD, 3 * MiB + 5, MAX_PAYLOAD]
)
async def test_write_payload_arriving_in_small_pieces(image_dir: Path, length: int) -> None:
    """Header first, then the payload in pieces from single bytes up, with pauses between; the
    last piece carries the next request. A small WRITE is charged when its header comes, a large
    one only when its payload starts to (a header alone costs nothing)."""
    path = image_dir / "disk.img"
    offset = 12345
    size = offset + MAX_PAYLOAD + MiB
    make_image(path, size, seed=None)
    payload = random.Random(length).randbytes(length)
    async with file_export(path) as export, serving(export) as s:
        c, budget = s.client, s.state.budget
        await c.send(c.request(Cmd.WRITE, 1, offset, length))
        await wait_until(lambda: budget.requests == 1)
        assert budget.used == (length if length < DIRECT_PAYLOAD else 0)
        sent = 0
        sizes = list(pieces(length))
        for number, piece in enumerate(sizes):
            last = number == len(sizes) - 1
            chunk = payload[sent : sent + piece]
            sent += piece
            if last:  # the next request right behind the payload, in the same send
                await c.send(chunk + c.request(Cmd.READ, 2, offset - 100, 100))
                break
            await c.send(chunk)
            if number == 0:
                await wait_until(lambda: budget.used == length)  # charged now at the latest
            await trio.sleep(0.001)  # let the plane take the payload piece by piece
        got = await c.replies(2)
        assert got[1] == Reply(1)
        assert got[2] == Reply(2, data=bytes(100))
        await c.send(
            c.request(Cmd.READ, 3, offset, length), c.request(Cmd.READ, 4, offset + length, 100)
        )
        got = await c.replies(2)
        assert got[3].error == 0 and got[3].data == payload
        assert got[4] == Reply(4, data=bytes(100))
        await budget_returns(s.state)
    assert read_file(path, offset, length) == payload


# -- pipelining and flow control ------------------------------------------------------------------


@STRUCTURED
async def test_pipelining_far_beyond_max_requests(image_dir: Path, structured: bool) -> None:
    """300 READs and WRITEs (small and large) sent at once to a connection that admits 4 at a
    time: the client's sending is slowed, never refused; every request is answered with the
    right data, and the budget is all given back."""
    path = image_dir / "disk.img"
    size, slot = 16 * MiB, 80 * KiB  # WRITEs go to their own slot below 8 MiB, READs above
    model = bytearray(make_image(path, size, seed=4))
    if not on_tmpfs(path):
        drop_page_cache(path)  # READs that the event loop answers, mixed with inline ones
    rng = random.Random(5)
    state = ServerState(Limits(max_requests=4))
    async with (
        file_export(path) as export,
        serving(export, structured=structured, state=state) as s,
    ):
        c = s.client
        kinds = ["write"] * 100 + ["read"] * 200
        rng.shuffle(kinds)
        stream = bytearray()
        reads: dict[int, tuple[int, int]] = {}
        writes = 0
        for cookie, kind in enumerate(kinds):
            if kind == "write":
                length = rng.choice([1, rng.randrange(1, slot), slot])
                offset = writes * slot + rng.randrange(slot - length + 1)
                data = rng.randbytes(length)
                model[offset : offset + length] = data
                stream += c.write(cookie, offset, data)
                writes += 1
            else:
                length = rng.choice([1, rng.randrange(1, 256 * KiB), 256 * KiB])
                offset = rng.randrange(8 * MiB, size - length)
                reads[cookie] = (offset, length)
                stream += c.request(Cmd.READ, cookie, offset, length)
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, state.budget.requests)
                await trio.sleep(0.001)

        got: dict[int, Reply] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(c.send, stream)
            got = await c.replies(len(kinds))  # read while sending: the client must
            nursery.cancel_scope.cancel()
        assert set(got) == set(range(len(kinds)))
        for cookie, reply in got.items():
            assert reply.error == 0, cookie
            if cookie in reads:
                offset, length = reads[cookie]
                assert reply.data == model[offset : offset + length], cookie
        assert most <= 4
        await budget_returns(state)
        await c.send(c.request(Cmd.READ, 1000, 0, 8 * MiB))
        assert (await c.reply()).data == model[: 8 * MiB]
    assert read_file(path, 0, size) == model


@pytest.mark.parametrize(
    ("length", "structured"),
    [(ACCEPTED + 1, False), (ACCEPTED + 1, True), (DRAIN_LIMIT, False)],
    ids=["maximum+1-simple", "maximum+1-structured", "drain-limit-simple"],
)
async def test_oversized_write_is_refused_and_the_stream_stays_in_step(
    shm: Path, length: int, structured: bool
) -> None:
    """A WRITE above the maximum payload (up to the drain limit) is answered EINVAL, its payload
    is dropped unread, and the requests around it are answered. The payload is made of valid
    READ headers: any that the server parsed would get a reply."""
    path = shm / "disk.img"
    size = MiB
    model = make_image(path, size, seed=6)
    fake = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 999, 0, 512)
    block = (fake * (MiB // len(fake) + 1))[:MiB]
    async with file_export(path) as export, serving(export, structured=structured) as s:
        c = s.client
        head = c.request(Cmd.READ, 1, 0, 512) + c.request(Cmd.WRITE, 2, 0, length)
        await c.send(head + block[:100])  # part of the payload in the request's batch
        sent = 100
        while sent < length:
            piece = memoryview(block)[: min(MiB, length - sent)]
            sent += len(piece)
            if sent == length:  # the next request right behind the payload, in one send
                await c.send(bytes(piece) + c.request(Cmd.READ, 3, 4096, 512))
            else:
                await c.send(piece)
        got = await c.replies(3)
        assert got[1].error == 0 and got[1].data == model[:512]
        assert got[2].error == Errno.EINVAL
        if structured:
            assert got[2].chunks == [ERROR_CHUNK]
        assert got[3].error == 0 and got[3].data == model[4096 : 4096 + 512]
        await c.send(c.request(Cmd.READ, 4, 0, 4))
        assert (await c.reply()).cookie == 4  # no reply to anything inside the payload
        await budget_returns(s.state)
    assert read_file(path, 0, size) == model


async def test_write_beyond_the_drain_limit_closes_the_connection(shm: Path) -> None:
    make_image(shm / "disk.img", MiB, seed=None)
    async with file_export(shm / "disk.img") as export, serving(export) as s:
        c = s.client
        await c.send(c.request(Cmd.READ, 1, 0, 16))
        assert await c.reply() == Reply(1, data=bytes(16))
        await c.send(c.request(Cmd.WRITE, 2, 0, DRAIN_LIMIT + 1) + bytes(1000))
        await c.closed()
        await s.ended()
        await budget_returns(s.state)


async def test_bad_magic_closes_the_connection(shm: Path) -> None:
    make_image(shm / "disk.img", MiB, seed=None)
    async with file_export(shm / "disk.img") as export, serving(export) as s:
        c = s.client
        await c.send(c.request(Cmd.READ, 1, 0, 16))
        assert await c.reply() == Reply(1, data=bytes(16))
        bad = REQUEST.pack(REQUEST_MAGIC ^ 1, 0, Cmd.READ, 2, 0, 16)
        await c.send(bad + c.request(Cmd.READ, 3, 0, 16))
        await c.closed()
        await s.ended()
        await budget_returns(s.state)


# -- the end of a connection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    [
        "inside a header",
        "after a small WRITE header",
        "inside a small WRITE payload",
        "after a large WRITE header",
        "inside a large WRITE payload",
    ],
)
async def test_end_of_stream_inside_a_request_closes_cleanly(shm: Path, cut: str) -> None:
    """The client half-closes in the middle of a request: the requests before it are answered,
    then the server closes and ``serve`` returns without an exception."""
    make_image(shm / "disk.img", 2 * MiB, seed=None)
    async with file_export(shm / "disk.img") as export, serving(export) as s:
        c = s.client
        small, large = 1000, MiB
        partial = {
            "inside a header": c.request(Cmd.READ, 2, 0, 16)[:20],
            "after a small WRITE header": c.request(Cmd.WRITE, 2, 0, small),
            "inside a small WRITE payload": c.request(Cmd.WRITE, 2, 0, small) + bytes(10),
            "after a large WRITE header": c.request(Cmd.WRITE, 2, 0, large),
            "inside a large WRITE payload": c.request(Cmd.WRITE, 2, 0, large) + bytes(1000),
        }[cut]
        await c.send(c.request(Cmd.READ, 1, 0, 16))
        assert await c.reply() == Reply(1, data=bytes(16))
        await c.send(partial)
        await c.stream.send_eof()
        await s.ended()
        await c.closed()
        await budget_returns(s.state)


async def test_end_of_stream_answers_the_requests_in_flight_then_closes(shm: Path) -> None:
    model = make_image(shm / "disk.img", 2 * MiB, seed=7)
    async with file_export(shm / "disk.img") as export, serving(export) as s:
        c = s.client
        async with export.paused():  # the requests wait on the event loop
            await c.send(*(c.request(Cmd.READ, i, i * 4096, 4096) for i in range(8)))
            await wait_until(lambda: s.state.budget.requests == 8)
            await c.stream.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            assert c.holds_nothing()
        got = await c.replies(8)
        assert {i: r.data for i, r in got.items()} == {
            i: model[i * 4096 : (i + 1) * 4096] for i in range(8)
        }
        await c.closed()
        await s.ended()
        await budget_returns(s.state)


async def test_disconnect_answers_the_requests_in_flight_then_closes(
    shm: Path, planes: list[DataPlane]
) -> None:
    path = shm / "disk.img"
    model = bytearray(make_image(path, 2 * MiB, seed=8))
    async with file_export(path) as export, serving(export) as s:
        c = s.client
        small, large = os.urandom(100), os.urandom(200 * KiB)
        async with export.paused():
            await c.send(
                c.request(Cmd.READ, 1, 0, 512),
                c.write(2, 4096, small),
                c.request(Cmd.READ, 3, MiB, MiB),
                c.write(4, 8192, large),
            )
            await wait_until(lambda: s.state.budget.requests == 4)
            # a READ behind DISC (which a client must not send), in the same segment: the
            # plane reads it with DISC and ignores it. Sent later, it would stay unread and
            # the close would reach the client as a reset.
            await c.send(c.request(Cmd.DISC, 5) + c.request(Cmd.READ, 6, 0, 16))
            await wait_until(lambda: planes[0]._end == "disconnect requested")
            await trio.testing.wait_all_tasks_blocked()
            assert c.holds_nothing()  # in flight: none answered while the export is paused
        got = await c.replies(4)  # the READ behind DISC gets nothing
        assert got[1].data == model[:512] and got[3].data == model[MiB : 2 * MiB]
        assert got[2] == Reply(2) and got[4] == Reply(4)
        await c.closed()
        await s.ended()
        await budget_returns(s.state)
    model[4096:4196] = small
    model[8192 : 8192 + len(large)] = large
    assert read_file(path, 0, 2 * MiB) == model


async def test_pending_bytes_behind_the_handshake_are_served(shm: Path) -> None:
    """Requests the client sent right behind its handshake reach the plane as ``pending``."""
    model = make_image(shm / "disk.img", MiB, seed=9)
    async with file_export(shm / "disk.img") as export:
        client_end, server_end = socket_pair()
        client = Client(client_end)
        conn = Connection(server_end, OneExport(export), ServerState())
        conn.pending = client.request(Cmd.READ, 1, 10, 100) + client.request(Cmd.READ, 2, 0, 3)
        session = Session(client, conn, conn.state)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, negotiated_for(export, False))
                try:
                    got = await client.replies(2)
                    assert got[1].data == model[10:110] and got[2].data == model[:3]
                    await client.send(client.request(Cmd.DISC, 3))
                    await client.closed()
                    await session.ended()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await client_end.aclose()


# -- the export's pause gate ----------------------------------------------------------------------


@STRUCTURED
async def test_no_request_completes_while_the_export_is_paused(shm: Path, structured: bool) -> None:
    path = shm / "disk.img"
    model = bytearray(make_image(path, 4 * MiB, seed=10))
    before = bytes(model)
    async with file_export(path) as export, serving(export, structured=structured) as s:
        backend = counts(export)
        c = s.client
        writes = {1: (0, os.urandom(100)), 3: (MiB, os.urandom(300 * KiB))}
        reads = {2: (2 * MiB, 512), 4: (3 * MiB, 512 * KiB)}
        async with export.paused():
            backend.paused = True
            await c.send(
                c.write(1, *writes[1]),
                c.request(Cmd.READ, 2, *reads[2]),
                c.write(3, *writes[3]),
                c.request(Cmd.READ, 4, *reads[4]),
            )
            await wait_until(lambda: s.state.budget.requests == 4)
            await trio.testing.wait_all_tasks_blocked()
            assert c.holds_nothing()
            assert read_file(path, 0, len(before)) == before  # nothing was written
            backend.paused = False
        got = await c.replies(4)
        for cookie, (offset, data) in writes.items():
            assert got[cookie].error == 0
            model[offset : offset + len(data)] = data
        for cookie, (offset, length) in reads.items():
            assert got[cookie].data == model[offset : offset + length]
        assert backend.calls_while_paused == 0
        await budget_returns(s.state)
    assert read_file(path, 0, len(model)) == model


async def test_pausing_a_busy_connection_stops_its_backend_calls(shm: Path) -> None:
    """The plane's thread passes the gate once per batch: while ``paused()`` is held, not one
    backend call is made, although the client keeps sending; afterwards all are answered."""
    path = shm / "disk.img"
    size = 4 * MiB
    make_image(path, size, seed=11)
    async with file_export(path) as export, serving(export) as s:
        backend = counts(export)
        c = s.client
        count = 3000
        rng = random.Random(12)
        stream = bytearray()
        for cookie in range(count):
            offset = rng.randrange(0, size - 8 * KiB)
            if cookie % 3:
                stream += c.request(Cmd.READ, cookie, offset, rng.choice([512, 8 * KiB]))
            else:
                stream += c.write(cookie, offset, rng.randbytes(rng.choice([16, 4 * KiB])))
        got: dict[int, Reply] = {}

        async def pause_now_and_then() -> None:
            for step in (1, 2, 3):
                least = step * count // 5
                await wait_until(lambda: len(got) > least)  # noqa: B023 (called right away)
                async with export.paused():
                    backend.paused = True
                    await trio.sleep(0.01)
                    backend.paused = False

        async def read_all() -> None:
            for _ in range(count):
                reply = await c.reply()
                got[reply.cookie] = reply

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            nursery.start_soon(pause_now_and_then)
            await c.send(stream)
        assert set(got) == set(range(count))
        assert all(reply.error == 0 for reply in got.values())
        assert backend.calls_while_paused == 0
        await budget_returns(s.state)


async def test_a_thread_lets_go_of_the_gate_when_it_sleeps_and_when_it_ends(shm: Path) -> None:
    """The thread keeps the export's gate across batches while it is busy, never while it
    waits for its client: a pause between two streams, and after the client left, comes at
    once (a thread that kept the gate would make it wait for ever)."""
    path = shm / "disk.img"
    make_image(path, 4 * MiB, seed=13)
    async with file_export(path) as export, serving(export, structured=True) as s:
        c = s.client
        for round_ in range(3):
            stream = b"".join(
                c.request(Cmd.READ, cookie, cookie * 4 * KiB, 4 * KiB) for cookie in range(64)
            )
            await c.send(stream)
            got = await c.replies(64)
            assert all(reply.error == 0 for reply in got.values()), round_
            await trio.sleep(0.05)  # past the plane's settling: its next sleep has no timeout
            with trio.fail_after(ENDS_WITHIN):
                async with export.paused():
                    pass
        await c.send(c.request(Cmd.DISC, 99, 0, 0))
        await s.ended()
        with trio.fail_after(ENDS_WITHIN):
            async with export.paused():
                pass


# -- the daemon-wide byte budget ------------------------------------------------------------------


async def test_a_client_that_never_reads_cannot_stop_another_connection(shm: Path) -> None:
    """Two connections share one budget; a connection may hold a quarter of it (here S = 8 MiB
    more than the floor). A's client sends large READs and never reads a reply, so A stops at
    S; B is served all the while (large and small READs and WRITEs), and everything is given
    back once A reads."""
    share = FLOOR + U
    limits = Limits(max_bytes=4 * share)
    assert limits.max_bytes_per_connection == share
    size = 48 * MiB
    model = bytearray(make_image(shm / "disk.img", size, seed=13))
    state = ServerState(limits)
    budget = state.budget
    reads = share // U + 3  # A's READs of U bytes at i MiB: more than its share
    async with (
        file_export(shm / "disk.img") as export,
        serving(export, state=state) as a,
        serving(export, state=state) as b,
    ):
        ca, cb = a.client, b.client
        await ca.send(*(ca.request(Cmd.READ, i, i * MiB, U) for i in range(reads)))
        await wait_until(lambda: budget.used == share and budget.requests == share // U)
        for round_ in range(3):
            model[40 * MiB : 40 * MiB + 10] = bytes([round_]) * 10
            await cb.send(
                cb.request(Cmd.READ, 1, 8 * MiB, U),
                cb.request(Cmd.READ, 2, 16 * MiB, MAX_PAYLOAD),
                cb.write(3, 40 * MiB, bytes([round_]) * 10),
                cb.request(Cmd.READ, 4, 40 * MiB, U),
                cb.request(Cmd.READ, 5, 0, 512),
            )
            got = await cb.replies(5)
            assert got[1].data == model[8 * MiB : 16 * MiB]
            assert got[2].data == model[16 * MiB : 48 * MiB]
            assert got[3] == Reply(3) and got[4].data == model[40 * MiB : 48 * MiB]
            assert got[5].error == 0
            assert budget.used >= share  # A still holds its share
        got = await ca.replies(reads)  # A reads at last: all its READs are answered
        for i in range(reads):
            assert got[i].data == model[i * MiB : i * MiB + U]
        await budget_returns(state)


async def test_waiting_connections_behind_a_stuck_one_are_still_served(shm: Path) -> None:
    """Three connections, one budget of F + 16 MiB, F the floor of a connection's share (one
    maximum payload). X holds F; A (whose client never reads) takes 16 MiB and waits in line
    for more; B waits behind A. X's client reads, its F bytes come back: A is woken, takes 8
    MiB and queues again for its next READ. B must then be served: the daemon holds 24 MiB."""
    assert FLOOR <= ACCEPTED
    limits = Limits(max_bytes=FLOOR + 2 * U)
    assert limits.max_bytes_per_connection == FLOOR
    make_image(shm / "disk.img", FLOOR, seed=None)
    state = ServerState(limits)
    budget = state.budget
    async with (
        file_export(shm / "disk.img") as export,
        serving(export, state=state) as x,
        serving(export, state=state) as a,
        serving(export, state=state) as b,
    ):
        await x.client.send(x.client.request(Cmd.READ, 1, 0, FLOOR))
        await wait_until(lambda: budget.used == FLOOR)
        await a.client.send(*(a.client.request(Cmd.READ, i, 0, U) for i in range(6)))
        await wait_until(lambda: budget.used == limits.max_bytes and budget.waiting == 1)
        await b.client.send(b.client.request(Cmd.READ, 1, 0, U))
        await wait_until(lambda: budget.waiting == 2)
        assert (await x.client.reply()).data == bytes(FLOOR)
        with trio.move_on_after(ENDS_WITHIN) as waited:
            reply = await b.client.reply()
        assert not waited.cancelled_caught, (
            f"B's READ is not answered while the daemon holds {budget.used // MiB} of its "
            f"{limits.max_bytes // MiB} MiB; connections in line: {budget.waiting}"
        )
        assert reply.data == bytes(U)
        assert (await a.client.replies(6)).keys() == set(range(6))
        await budget_returns(state)


async def test_bytes_taken_ahead_go_back_to_a_connection_in_line(shm: Path) -> None:
    """A's 4 KiB READ takes bytes ahead of its requests (budget.py), and its client then sends
    nothing more: A sleeps holding them. B asks for every byte of the daemon's budget, waits in
    line, and is served once A has slept long enough to give them back (SETTLE_AFTER_MS)."""
    limits = Limits(max_bytes=FLOOR)
    make_image(shm / "disk.img", FLOOR, seed=None)
    state = ServerState(limits)
    async with (
        file_export(shm / "disk.img") as export,
        serving(export, state=state) as a,
        serving(export, state=state) as b,
    ):
        await a.client.send(a.client.request(Cmd.READ, 1, 0, 4096))
        assert (await a.client.reply()).data == bytes(4096)
        await b.client.send(b.client.request(Cmd.READ, 2, 0, FLOOR))
        with trio.fail_after(ENDS_WITHIN):
            reply = await b.client.reply()
        assert reply.data == bytes(FLOOR)
        await budget_returns(state)


async def test_stop_answers_eshutdown_without_waiting_for_budget(shm: Path) -> None:
    """A waits in line for bytes that B, whose client never reads, holds. When the server
    stops, A's requests (a READ, and a WRITE whose payload is dropped, not received) get
    ESHUTDOWN at once: a stop must not wait for budget, nor for the grace period."""
    limits = Limits(max_bytes=FLOOR, shutdown_grace=30.0)
    make_image(shm / "disk.img", FLOOR, seed=None)
    state = ServerState(limits)
    budget = state.budget
    async with (
        file_export(shm / "disk.img") as export,
        serving(export, state=state) as b,
        serving(export, state=state) as a,
    ):
        await b.client.send(b.client.request(Cmd.READ, 1, 0, FLOOR))
        await wait_until(lambda: budget.used == FLOOR)
        await a.client.send(a.client.request(Cmd.READ, 1, 0, U))
        await wait_until(lambda: budget.waiting == 1)
        state.stopping.set()
        await a.client.send(a.client.write(2, 0, bytes(DIRECT_PAYLOAD)))
        with trio.fail_after(ENDS_WITHIN):
            replies = await a.client.replies(2)
        assert {c: r.error for c, r in replies.items()} == {1: Errno.ESHUTDOWN, 2: Errno.ESHUTDOWN}
        assert (await b.client.reply()).data == bytes(FLOOR)  # in flight before the stop: served


# -- ByteBudget -----------------------------------------------------------------------------------


class Wakes:
    """Records which connection's waker was called, and checks it was called unlocked."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.calls: list[int] = []

    def of(self, key: int) -> Callable[[], None]:
        def wake() -> None:
            lock = self.budget._lock
            assert lock.acquire(blocking=False), "waker called with the budget's lock held"
            lock.release()
            self.calls.append(key)

        return wake


def test_per_connection_share_is_a_quarter_but_at_least_one_maximum_payload() -> None:
    assert FLOOR >= MAX_PAYLOAD
    assert Limits(max_bytes=4 * FLOOR + 4 * MiB).max_bytes_per_connection == FLOOR + MiB
    assert Limits(max_bytes=8 * MiB).max_bytes_per_connection == FLOOR


def test_budget_take_give_back_and_own_share() -> None:
    share = FLOOR
    budget = ByteBudget(Limits(max_bytes=4 * share))
    wakes = Wakes(budget)
    budget.count(6)  # the requests below
    assert budget.take(0, 0, 1, wakes.of(1)) is Grant.TAKEN and budget.used == 0
    assert budget.take(20 * MiB, 0, 1, wakes.of(1)) is Grant.TAKEN
    assert budget.take(share - 20 * MiB, 20 * MiB, 1, wakes.of(1)) is Grant.TAKEN
    assert budget.used == share
    # the connection holds its share: refused at once, and not put in line
    assert budget.take(1, share, 1, wakes.of(1)) is Grant.OWN_SHARE
    assert budget.take(0, share, 1, wakes.of(1)) is Grant.TAKEN  # costs nothing
    for key in (2, 3, 4):
        assert budget.take(share, 0, key, wakes.of(key)) is Grant.TAKEN
    assert budget.used == 4 * share
    assert budget.take(1, 0, 5, wakes.of(5)) is Grant.QUEUED
    budget.give_back(0, 0)
    assert wakes.calls == []  # no bytes came back: nobody is woken
    budget.give_back(20 * MiB, 1)
    assert wakes.calls == [5]  # 1 was never in line
    assert budget.take(1, 0, 5, wakes.of(5)) is Grant.TAKEN
    assert budget.requests == 5 and budget.used == 4 * share - 20 * MiB + 1
    budget.give_back(share - 20 * MiB, 1)
    budget.give_back(3 * share, 3)
    budget.give_back(1, 1)
    assert budget.used == 0 and budget.requests == 0
    assert wakes.calls == [5]


def test_budget_take_ahead_takes_spare_bytes_only_while_nobody_waits() -> None:
    budget = ByteBudget(Limits(max_bytes=FLOOR + 8 * MiB))  # FLOOR per connection
    wakes = Wakes(budget)
    assert budget.take_ahead(4096, MiB, 0, 1, wakes.of(1)) == (Grant.TAKEN, MiB)
    assert budget.used == 4096 + MiB
    assert budget.take_ahead(FLOOR, MiB, 0, 2, wakes.of(2)) == (Grant.TAKEN, MiB)
    # at most half of what is free after the request itself: 2 MiB - 4 KiB are
    assert budget.take_ahead(4 * MiB, 4 * MiB, 0, 3, wakes.of(3)) == (Grant.TAKEN, MiB - 2048)
    assert budget.used == FLOOR + 7 * MiB + 2048
    assert budget.take_ahead(1, MiB, FLOOR, 2, wakes.of(2)) == (Grant.OWN_SHARE, 0)
    assert budget.take_ahead(4 * MiB, MiB, 0, 4, wakes.of(4)) == (Grant.QUEUED, 0)
    # someone is in line: the line decides, and nothing is taken ahead
    assert budget.line == {4: budget.line[4]}
    assert budget.take_ahead(1, MiB, 0, 5, wakes.of(5)) == (Grant.QUEUED, 0)
    budget.give_back(budget.used, 0)
    assert wakes.calls == [4]
    assert budget.take_ahead(4 * MiB, MiB, 0, 4, wakes.of(4)) == (Grant.TAKEN, 0)
    assert budget.used == 4 * MiB and list(budget.line) == [5]


def test_budget_lets_a_request_larger_than_the_budget_run_alone() -> None:
    budget = ByteBudget(Limits(max_bytes=8 * MiB))
    wakes = Wakes(budget)
    assert budget.take(16 * MiB, 0, 1, wakes.of(1)) is Grant.TAKEN  # nothing else held
    assert budget.take(1, 0, 2, wakes.of(2)) is Grant.QUEUED
    budget.give_back(16 * MiB, 1)
    assert wakes.calls == [2]
    assert budget.take(1, 0, 2, wakes.of(2)) is Grant.TAKEN


def test_budget_waiters_are_served_first_come_first_served() -> None:
    budget = ByteBudget(Limits(max_bytes=3 * FLOOR + 4 * MiB))  # FLOOR per connection
    wakes = Wakes(budget)
    for key in (1, 2, 3):
        assert budget.take(FLOOR, 0, key, wakes.of(key)) is Grant.TAKEN
    assert budget.take(8 * MiB, 0, 4, wakes.of(4)) is Grant.QUEUED  # 4 MiB are free
    # 2 MiB would fit, but 4 came first: a small request does not overtake a large one
    assert budget.take(2 * MiB, 0, 5, wakes.of(5)) is Grant.QUEUED
    assert budget.take(2 * MiB, 0, 5, wakes.of(5)) is Grant.QUEUED  # asking again: same place
    budget.give_back(FLOOR, 1)
    assert wakes.calls == [4]  # the first in line only
    assert budget.take(2 * MiB, 0, 5, wakes.of(5)) is Grant.QUEUED  # still behind 4
    assert budget.take(8 * MiB, 0, 4, wakes.of(4)) is Grant.TAKEN
    assert budget.used == 2 * FLOOR + 8 * MiB


def test_budget_forget_leaves_the_line_and_wakes_the_next() -> None:
    budget = ByteBudget(Limits(max_bytes=3 * FLOOR + 4 * MiB))
    wakes = Wakes(budget)
    for key in (1, 2, 3):
        assert budget.take(FLOOR, 0, key, wakes.of(key)) is Grant.TAKEN
    assert budget.take(8 * MiB, 0, 4, wakes.of(4)) is Grant.QUEUED
    assert budget.take(2 * MiB, 0, 5, wakes.of(5)) is Grant.QUEUED
    budget.forget(1)  # not in line: nothing happens
    assert wakes.calls == []
    budget.forget(4)  # 4's connection ended while it waited
    assert wakes.calls == [5]
    assert budget.take(2 * MiB, 0, 5, wakes.of(5)) is Grant.TAKEN
    budget.forget(5)
    assert wakes.calls == [5]


class PlaneModel:
    """Connections as data-plane threads use the budget: each has requests to admit in order,
    and a woken one retries until a request is refused."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.todo: dict[int, list[int]] = {}
        self.held: dict[int, int] = {}
        self.woken: list[int] = []

    def send(self, key: int, *costs: int) -> None:
        self.todo.setdefault(key, []).extend(costs)
        self.run(key)

    def run(self, key: int) -> None:
        todo = self.todo[key]
        while todo:
            held = self.held.get(key, 0)
            grant = self.budget.take(todo[0], held, key, lambda: self.woken.append(key))
            if grant is not Grant.TAKEN:
                return
            self.held[key] = held + todo.pop(0)

    def release(self, key: int) -> None:
        """The connection's replies are all sent."""
        self.budget.give_back(self.held.pop(key), 1)

    def settle(self) -> None:
        while self.woken:
            self.run(self.woken.pop(0))


def test_budget_wakes_the_next_in_line_when_the_first_leaves_it_with_room() -> None:
    """The budget-level form of ``test_waiting_connections_behind_a_stuck_one_are_still_served``:
    A is woken, takes bytes and queues again behind B, while the daemon has room for B."""
    budget = ByteBudget(Limits(max_bytes=FLOOR + 2 * U))
    model = PlaneModel(budget)
    model.send(0, FLOOR)  # X
    model.send(1, U, U, U, U, U)  # A: takes 2 U, waits
    model.send(2, U)  # B: behind A
    assert budget.used == FLOOR + 2 * U and model.held == {0: FLOOR, 1: 2 * U}
    model.release(0)  # wakes A, which takes U and queues again, behind B
    model.settle()
    assert model.held.get(2) == U, (
        f"B is still waiting with {budget.used // MiB} of {(FLOOR + 2 * U) // MiB} MiB held"
    )


def test_budget_is_safe_across_threads() -> None:
    budget = ByteBudget(Limits(max_bytes=64 * MiB))
    errors: list[BaseException] = []

    def worker(key: int) -> None:
        try:
            for _ in range(5000):
                if budget.take(KiB, 0, key, lambda: None) is Grant.TAKEN:
                    budget.count(1)
                    budget.give_back(KiB, 1)
                else:
                    budget.forget(key)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(key,)) for key in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert budget.used == 0 and budget.requests == 0 and not budget.waiting


# -- cow-target -----------------------------------------------------------------------------------


@STRUCTURED
async def test_cow_export_inline_reads_of_present_and_absent_blocks(
    image_dir: Path, structured: bool
) -> None:
    """Partial writes copy absent blocks up from the base, rewrites of present blocks go
    straight to the overlay, all of it inline where the files never make I/O wait (tmpfs), and
    every READ, whether of present blocks, absent ones or both, returns base + overlay; the
    base is never written."""
    base = image_dir / "base.img"
    size = 256 * KiB + 1000  # the last block is partial
    original = make_image(base, size, seed=14)
    model = bytearray(original)
    cow_dir = image_dir / "cow"
    cow_dir.mkdir()
    backend = CountingCow.open(str(base), cow_dir=str(cow_dir))
    assert isinstance(backend, CountingCow)
    async with exported(backend) as export, serving(export, structured=structured) as s:
        c = s.client
        cookies = itertools.count()

        async def write(offset: int, length: int) -> None:
            data = os.urandom(length)
            model[offset : offset + length] = data
            cookie = next(cookies)
            await c.send(c.write(cookie, offset, data))
            assert await c.reply() == Reply(cookie)

        async def check(ranges: Sequence[tuple[int, int]]) -> None:
            first = next(cookies)
            await c.send(
                *(c.request(Cmd.READ, first + i, off, n) for i, (off, n) in enumerate(ranges))
            )
            for _ in ranges:
                next(cookies)
            got = await c.replies(len(ranges))
            for i, (off, n) in enumerate(ranges):
                assert got[first + i].error == 0
                assert got[first + i].data == model[off : off + n], (off, n)

        whole = [(0, size), (0, BLOCK_SIZE), (BLOCK_SIZE - 10, 20), (size - 500, 500)]
        await check(whole)  # nothing present: all from the base
        await write(100, 50)  # partial, absent block 0: copy-up
        await write(5 * BLOCK_SIZE - 10, 2 * BLOCK_SIZE + 20)  # partial 4 and 7, whole 5 and 6
        await write(size - 300, 100)  # inside the partial last block
        if on_tmpfs(base):  # copy-ups too: the thread holds the blocks without waiting
            assert backend.inline_writes == 3
        assert backend.async_writes == 3 - backend.inline_writes
        await check(whole)
        await check([(0, 3 * BLOCK_SIZE), (4 * BLOCK_SIZE + 7, 3 * BLOCK_SIZE), (90, 70)])
        await check([(5 * BLOCK_SIZE, BLOCK_SIZE), (7 * BLOCK_SIZE, BLOCK_SIZE)])
        await write(110, 10)  # present block: rewritten inline
        await write(5 * BLOCK_SIZE, BLOCK_SIZE)  # a whole present block
        await write(7 * BLOCK_SIZE + 100, BLOCK_SIZE)  # present block 7, absent block 8
        if on_tmpfs(base):  # a disk may decline RWF_NOWAIT writes; tmpfs never does
            assert backend.inline_writes == 6
        assert backend.async_writes == 6 - backend.inline_writes
        await check(whole)
        await check([(6 * BLOCK_SIZE, 2 * BLOCK_SIZE + 1), (100, 30)])
        if on_tmpfs(base):  # the page cache may decline; tmpfs never does
            assert backend.async_reads == 0
            assert "declined" not in backend.inline_reads  # one source may send a file range
        await budget_returns(s.state)
    assert read_file(base, 0, size) == original


# -- extended headers ------------------------------------------------------------------------------

GiB = 1024 * MiB
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)


async def test_extended_headers_with_64_bit_lengths_on_a_large_sparse_image(
    image_dir: Path,
) -> None:
    """32-byte requests and extended replies for every command; WRITE_ZEROES, TRIM, CACHE and
    BLOCK_STATUS of more than 4 GiB in one request; READ and WRITE stay bounded."""
    path = image_dir / "disk.img"
    size = 8 * GiB
    make_image(path, size, seed=None)
    small, large = os.urandom(1000), os.urandom(200 * KiB + 3)
    async with (
        file_export(path) as export,
        serving(export, extended=True, contexts=["base:allocation"]) as s,
    ):
        c = s.client
        await c.send(
            c.write(1, 100, small),  # with PAYLOAD_LEN, as the spec wants
            c.request(Cmd.WRITE, 2, 6 * GiB, 4, flags=0) + b"qemu",  # qemu 10: no flag
            c.write(3, 3 * GiB + 5, large),  # large: received into its own buffer
            c.request(Cmd.FLUSH, 4),
        )
        got = await c.replies(4)
        for cookie in range(1, 5):  # no simple replies with extended headers
            assert got[cookie].error == 0 and got[cookie].chunks == [NONE_CHUNK], cookie
        await c.send(
            c.request(Cmd.READ, 5, 100, 1000),
            c.request(Cmd.READ, 6, 6 * GiB, 4),
            c.request(Cmd.READ, 7, 3 * GiB + 5, len(large)),
            c.request(Cmd.READ, 8, 5 * GiB, MiB),  # a hole
        )
        got = await c.replies(4)
        assert got[5].data == small and got[6].data == b"qemu" and got[7].data == large
        assert got[8].data == bytes(MiB) and got[8].chunks[0] in (OFFSET_HOLE, OFFSET_DATA)
        assert got[5].chunks == [OFFSET_DATA]

        # one request each for more than 4 GiB, answered without data
        await c.send(
            c.request(Cmd.BLOCK_STATUS, 9, 0, size),
            c.request(Cmd.CACHE, 10, GiB, 6 * GiB),
            c.request(Cmd.WRITE_ZEROES, 11, GiB, 5 * GiB),  # over the large write at 3 GiB
            c.request(Cmd.TRIM, 12, 7 * GiB - 4096, GiB + 4096),
        )
        got = await c.replies(4)
        extents = got[9].status[1]
        assert sum(length for length, _flags in extents) == size  # one 8 GiB answer
        assert got[9].chunks == [int(ReplyType.BLOCK_STATUS_EXT)]
        for cookie in (10, 11, 12):
            assert got[cookie].error == 0 and got[cookie].chunks == [NONE_CHUNK], cookie
        await c.send(
            c.request(Cmd.READ, 13, 3 * GiB + 5, len(large)),
            c.request(Cmd.READ, 14, 6 * GiB, 4),
            c.request(Cmd.BLOCK_STATUS, 15, 0, size, flags=int(CmdFlag.REQ_ONE)),
            c.request(Cmd.BLOCK_STATUS, 20, 0, size),
        )
        got = await c.replies(4)
        assert got[13].data == bytes(len(large)) and got[14].data == b"qemu"  # just after
        assert got[15].status[1] == [(4096, 0)]  # the data at 100..1100, alone
        extents = got[20].status[1]
        assert sum(length for length, _flags in extents) == size
        # zeroed (punched) from the first page to 6 GiB: one extent beyond 32 bits
        assert (6 * GiB - 4096, 3) in extents, extents
        assert read_file(path, 100, 1000) == small

        # out of bounds and oversized
        await c.send(
            c.request(Cmd.READ, 16, 0, ACCEPTED + 1),  # too large to read: may retry smaller
            c.request(Cmd.TRIM, 17, GiB, 8 * GiB),  # beyond the end
            c.request(Cmd.WRITE_ZEROES, 18, 8 * GiB - 1, 2),
            c.request(Cmd.BLOCK_STATUS, 19, 1, 2**64 - 2),
        )
        got = await c.replies(4)
        assert got[16].error == Errno.EOVERFLOW and got[16].chunks == [ERROR_CHUNK]
        assert got[17].error == Errno.EINVAL and got[18].error == Errno.ENOSPC
        assert got[19].error == Errno.EINVAL
        await budget_returns(s.state)


@pytest.mark.parametrize("length", [100, DIRECT_PAYLOAD + 1, ACCEPTED + 1])
async def test_payloads_on_commands_without_one_are_dropped_and_refused(
    shm: Path, length: int
) -> None:
    """PAYLOAD_LEN on a command with no payload form: its payload (made of valid requests,
    which would get replies if parsed) is dropped and the command refused with EINVAL."""
    make_image(shm / "disk.img", MiB, seed=4)
    fake = EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, 0, Cmd.READ, 999, 0, 512)
    junk = (fake * (length // len(fake) + 1))[:length]
    async with file_export(shm / "disk.img") as export, serving(export, extended=True) as s:
        c = s.client
        for cookie, cmd in enumerate([Cmd.READ, Cmd.TRIM, Cmd.CACHE, 77], 1):
            await c.send(c.request(cmd, cookie, 0, length, flags=PAYLOAD_LEN), junk)
            await c.send(c.request(Cmd.READ, 100 + cookie, 0, 16))
            got = await c.replies(2)
            assert got[cookie].error == Errno.EINVAL and got[cookie].chunks == [ERROR_CHUNK]
            assert got[100 + cookie].error == 0 and len(got[100 + cookie].data) == 16
        await budget_returns(s.state)


async def test_a_payload_beyond_the_drain_limit_closes(shm: Path) -> None:
    make_image(shm / "disk.img", MiB, seed=None)
    async with file_export(shm / "disk.img") as export, serving(export, extended=True) as s:
        c = s.client
        huge = c.request(Cmd.BLOCK_STATUS, 1, 0, DRAIN_LIMIT + 1, flags=PAYLOAD_LEN)
        await c.send(huge + bytes(1000))
        await c.closed()
        await s.ended()
        await budget_returns(s.state)


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
async def test_the_other_header_layout_closes_the_connection(shm: Path, extended: bool) -> None:
    """Framing is fixed by the handshake: a compact request on an extended connection (or the
    reverse) is a bad magic."""
    make_image(shm / "disk.img", MiB, seed=None)
    async with file_export(shm / "disk.img") as export, serving(export, extended=extended) as s:
        c = s.client
        await c.send(c.request(Cmd.READ, 1, 0, 16))
        assert (await c.reply()).data == bytes(16)
        if extended:
            other = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 2, 0, 16)
        else:
            other = EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, 0, Cmd.READ, 2, 0, 16)
        await c.send(other + bytes(64))
        await c.closed()
        await s.ended()


async def test_block_status_payload_answers_only_the_contexts_asked_for(shm: Path) -> None:
    size = 6 * GiB
    make_image(shm / "disk.img", size, seed=None)

    async def everything_odd(offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 1)]

    contexts = ["base:allocation", "x-test:odd"]
    async with file_export(shm / "disk.img") as export:
        export.extra_contexts["x-test:odd"] = everything_odd
        async with serving(export, extended=True, contexts=contexts) as s:
            c = s.client

            def status(cookie: int, *ids: int, length: int = size) -> bytes:
                body = struct.pack(f"!Q{len(ids)}I", length, *ids)
                flags = PAYLOAD_LEN
                return c.request(Cmd.BLOCK_STATUS, cookie, 0, len(body), flags=flags) + body

            await c.send(
                status(1, 2),
                status(2, 2, 1),
                c.request(Cmd.BLOCK_STATUS, 3, 0, size),  # no payload: every context
                status(4, 3),  # never selected
                status(5, 1, 1),  # twice
                status(6, 1, length=size + 1),  # beyond the end
            )
            got = await c.replies(6)
            assert got[1].status == {2: [(size, 1)]}
            assert got[2].status == {2: [(size, 1)], 1: [(size, 3)]}
            assert got[3].status == {1: [(size, 3)], 2: [(size, 1)]}
            for cookie in (4, 5, 6):
                assert got[cookie].error == Errno.EINVAL and not got[cookie].status, cookie
            await budget_returns(s.state)


ANY_FLAGS = [0, 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x21, 0x28]
NBD_ERRNOS = {0, *(int(e) for e in Errno)}


@st.composite
def extended_requests(draw: st.DrawFn, size: int) -> tuple[int, int, int, int, bytes]:
    """(command, flags, offset, length, payload) of an extended request, well framed but
    otherwise anything: unknown commands and flags, 64-bit lengths, payloads on any command."""
    cmd = draw(st.sampled_from([*(int(c) for c in Cmd if c is not Cmd.DISC), 77]))
    flags = draw(st.sampled_from(ANY_FLAGS))
    offset = draw(st.sampled_from([0, 4096, size - 1, size, 2**63]))
    if cmd == Cmd.WRITE or flags & PAYLOAD_LEN:
        payload = draw(st.binary(max_size=600))
        return cmd, flags, offset, len(payload), payload
    length = draw(st.sampled_from([0, 1, 4096, size, 2**33, 2**64 - 1]))
    return cmd, flags, offset, length, b""


SHM_DIR = Path("/dev/shm")


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
@settings(max_examples=40, deadline=None)
@given(st.data())
async def test_any_extended_requests_each_get_one_reply_and_keep_the_stream_in_step(
    data: st.DataObject,
) -> None:
    size = 8 * GiB
    requests = data.draw(st.lists(extended_requests(size), min_size=1, max_size=12))
    directory = Path(tempfile.mkdtemp(prefix="xnbdd-test-ext-", dir=SHM_DIR))
    try:
        make_image(directory / "disk.img", size, seed=None)
        async with (
            file_export(directory / "disk.img") as export,
            serving(export, extended=True, contexts=["base:allocation"]) as s,
        ):
            c = s.client
            wire = b"".join(
                c.request(cmd, cookie, offset, length, flags=flags) + payload
                for cookie, (cmd, flags, offset, length, payload) in enumerate(requests, 1)
            )
            await c.send(wire + c.request(Cmd.READ, 1000, 0, 16))
            got = await c.replies(len(requests) + 1)  # the decoder checks the offset echo
            assert sorted(got) == [*range(1, len(requests) + 1), 1000]
            assert all(reply.error in NBD_ERRNOS for reply in got.values())
            assert got[1000].error == 0 and len(got[1000].data) == 16  # still in step
            await budget_returns(s.state)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
