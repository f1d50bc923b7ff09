"""Large WRITE payloads through a pipe (xnbdd/payload_pipe.py): the pipe on real sockets, and
the data plane's use of it, over TCP as in production and over a unix socket pair."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.origin_servers import nbdkit, random_image
from tests.test_connection import wait_until
from tests.test_dataplane import (
    CountingCow,
    KiB,
    MiB,
    Reply,
    budget_returns,
    counts,
    exported,
    file_export,
    make_image,
    read_file,
    serving,
    shm,  # noqa: F401 (a fixture of the tests below)
)
from xnbdd import receive as receive_module
from xnbdd.backends.bitmap import BLOCK_SIZE
from xnbdd.backends.proxy import open_proxy_backend
from xnbdd.dataplane import DIRECT_PAYLOAD
from xnbdd.dial import RemoteAddress
from xnbdd.export import Export
from xnbdd.payload_pipe import PayloadPipe, PipeFull
from xnbdd.proto.consts import MAX_PAYLOAD, Cmd, CmdFlag
from xnbdd.tls import PlainTransport

ONE_PIECE = 4096  # the smallest pipe: it holds one piece, whatever its size


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Client and server ends of a TCP connection on the loopback (the server's non-blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    return client, server


def trio_tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    client, server = tcp_pair()
    client.setblocking(False)
    wrap = trio.socket.from_stdlib_socket
    return trio.SocketStream(wrap(client)), trio.SocketStream(wrap(server))


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def fill_exactly(pipe: PayloadPipe, fd: int, count: int) -> None:
    """Move ``count`` bytes from the socket ``fd`` into the pipe as they arrive."""
    transport = PlainTransport(fd)
    while count:
        try:
            count -= pipe.fill(transport, count)
        except BlockingIOError:
            assert select.select([fd], [], [], 5)[0], "the bytes did not come"


class Ample(PayloadPipe):
    """Pipes enough that loopback's pieces (a few KiB each, how many fit varies from run to
    run) never fill them: a test that counts piped writes then counts the same every run."""

    def __init__(self) -> None:
        super().__init__(max_pipes=64)


@pytest.fixture
def ample_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receive_module, "PayloadPipe", Ample)


@pytest.fixture
def image(shm: Path) -> Iterator[int]:  # noqa: F811 (the fixture above)
    fd = os.open(shm / "target.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MiB)
    try:
        yield fd
    finally:
        os.close(fd)


# -- the pipe -------------------------------------------------------------------------------------


def test_a_payload_moves_from_a_tcp_socket_into_the_file_behind_its_head(image: int) -> None:
    """The bytes that came with the header are written first, then the pipe's, at the offset;
    the pipe is empty after."""
    client, server = tcp_pair()
    payload = random.Random(1).randbytes(MiB)
    head, rest = payload[:5000], payload[5000:]
    sender = threading.Thread(target=client.sendall, args=(rest,))
    sender.start()
    pipe = Ample()
    try:
        pipe.begin(head)
        fill_exactly(pipe, server.fileno(), len(rest))
        assert pipe.held == len(rest)
        pipe.write_to(image, 4096 + 7)
        assert pipe.held == 0
        assert os.pread(image, len(payload), 4096 + 7) == payload
    finally:
        sender.join()
        pipe.close()
        client.close()
        server.close()


def test_take_gives_the_head_and_the_piped_bytes_and_begin_drops_what_was_left() -> None:
    client, server = socket.socketpair()
    server.setblocking(False)
    pipe = PayloadPipe()
    try:
        pipe.begin(b"head")
        client.sendall(b"first payload")
        fill_exactly(pipe, server.fileno(), 13)
        assert pipe.take() == b"headfirst payload"
        pipe.begin(b"")
        client.sendall(b"second")
        fill_exactly(pipe, server.fileno(), 6)
        assert pipe.take() == b"second"
        client.sendall(b"never written")  # a payload left behind (the connection stopping)
        fill_exactly(pipe, server.fileno(), 13)
        pipe.begin(b"")  # drops it
        client.sendall(b"third")
        fill_exactly(pipe, server.fileno(), 5)
        assert pipe.take() == b"third"
    finally:
        pipe.close()
        client.close()
        server.close()


def test_full_pipes_are_told_apart_from_an_empty_socket() -> None:
    """Pipes of one piece each take one of many small sends each, up to their number; then
    they say they are full while the socket still holds bytes. Once all is read, an empty
    socket says so."""
    client, server = socket.socketpair()
    server.setblocking(False)
    transport = PlainTransport(server.fileno())
    before = open_descriptors()
    pipe = PayloadPipe(ONE_PIECE, max_pipes=3)
    try:
        pipe.begin(b"<")
        for n in range(10):
            client.send(bytes([n]) * 1000)  # one message each: one piece each
        for _ in range(3):
            assert pipe.fill(transport, 10_000) == 1000
        with pytest.raises(PipeFull):
            pipe.fill(transport, 7000)
        assert open_descriptors() == before + 6  # three pipes
        assert pipe.take() == b"<" + bytes([0]) * 1000 + bytes([1]) * 1000 + bytes([2]) * 1000
        assert open_descriptors() == before + 2  # the payload gone, one pipe kept
        got, taken = 0, bytearray()
        while got < 7000:
            try:
                got += pipe.fill(transport, 7000 - got)
            except PipeFull:
                taken += pipe.take()
        taken += pipe.take()
        assert taken == b"".join(bytes([n]) * 1000 for n in range(3, 10))
        with pytest.raises(BlockingIOError):
            pipe.fill(transport, 1)
    finally:
        pipe.close()
        client.close()
        server.close()


def test_a_failed_write_leaves_the_pipe_empty_for_the_next_payload(shm: Path) -> None:  # noqa: F811
    readonly = os.open(shm / "ro.img", os.O_RDONLY | os.O_CREAT, 0o600)
    client, server = socket.socketpair()
    server.setblocking(False)
    pipe = PayloadPipe()
    try:
        pipe.begin(b"h")
        client.sendall(bytes(70_000))
        fill_exactly(pipe, server.fileno(), 70_000)
        with pytest.raises(OSError) as failed:
            pipe.write_to(readonly, 0)
        assert failed.value.errno == errno.EBADF
        assert pipe.held == 0
        pipe.begin(b"")
        client.sendall(b"next")
        fill_exactly(pipe, server.fileno(), 4)
        assert pipe.take() == b"next"
    finally:
        os.close(readonly)
        pipe.close()
        client.close()
        server.close()


# -- the data plane -------------------------------------------------------------------------------

# larger than the receive buffer (so not whole in it) up to the pipes' size, then larger
PIPED = [2 * DIRECT_PAYLOAD + 1, 512 * KiB, MiB, 3 * MiB + 5]
SIZES = [*PIPED, MAX_PAYLOAD]


async def test_large_writes_over_tcp_go_through_pipes_and_land_whole(
    shm: Path,  # noqa: F811
    ample_pipes: None,
) -> None:
    """Pipelined large WRITEs of several sizes, each followed by a small READ, on a TCP
    connection to a tmpfs image: those up to the pipes' size are written from the pipes,
    every one lands with its own data, and the stream stays in step."""
    path = shm / "disk.img"
    make_image(path, 8 * MiB + MAX_PAYLOAD, seed=None)
    offsets = [0, MiB, 2 * MiB, 4 * MiB, 8 * MiB]
    blobs = [random.Random(n).randbytes(size) for n, size in enumerate(SIZES)]
    async with file_export(path) as export, serving(export, pair=trio_tcp_pair) as s:
        c = s.client
        parts = []
        for n, (offset, blob) in enumerate(zip(offsets, blobs, strict=True)):
            parts += [c.write(2 * n, offset, blob), c.request(Cmd.READ, 2 * n + 1, offset, 16)]
        await c.send(*parts)
        got = await c.replies(2 * len(blobs))
        for n, blob in enumerate(blobs):
            assert got[2 * n] == Reply(2 * n)
            assert got[2 * n + 1] == Reply(2 * n + 1, data=blob[:16])
        assert counts(export).piped_writes == len(PIPED)
        assert counts(export).async_writes == 0
        await budget_returns(s.state)
    for offset, blob in zip(offsets, blobs, strict=True):
        assert read_file(path, offset, len(blob)) == blob


async def test_a_connection_whose_pipe_fills_spills_and_writes_without_one(
    shm: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payload that arrives in more pieces than the pipe holds is moved into a buffer
    halfway and written whole; the connection's next large WRITEs take no pipe."""

    class OnePiece(PayloadPipe):
        def __init__(self) -> None:
            super().__init__(ONE_PIECE, max_pipes=2)

    monkeypatch.setattr(receive_module, "PayloadPipe", OnePiece)
    path = shm / "disk.img"
    make_image(path, 4 * MiB, seed=None)
    first, second = os.urandom(MiB), os.urandom(MiB)
    async with file_export(path) as export, serving(export) as s:
        c = s.client
        await c.send(c.request(Cmd.WRITE, 1, 0, MiB) + first[:1000])
        await wait_until(lambda: s.state.budget.used == MiB)  # the payload has begun
        for start in range(1000, MiB, 64 * 1024):
            await c.send(first[start : start + 64 * 1024])  # pieces enough to fill it
        await c.send(c.write(2, MiB, second))
        got = await c.replies(2)
        assert got == {1: Reply(1), 2: Reply(2)}
        assert counts(export).piped_writes == 0
        await budget_returns(s.state)
    assert read_file(path, 0, 2 * MiB) == first + second


async def test_a_piped_write_past_a_shrunk_image_is_refused_and_the_stream_stays_in_step(
    shm: Path,  # noqa: F811
    ample_pipes: None,
) -> None:
    path = shm / "disk.img"
    make_image(path, 8 * MiB, seed=3)
    blob = os.urandom(MiB)
    async with file_export(path) as export, serving(export, pair=trio_tcp_pair) as s:
        os.truncate(path, 4 * MiB)
        c = s.client
        await c.send(
            c.write(1, 6 * MiB, blob),
            c.request(Cmd.READ, 2, 0, 100),
            c.write(3, MiB, blob),
        )
        got = await c.replies(3)
        assert got[1].error == errno.ENOSPC
        assert got[2] == Reply(2, data=read_file(path, 0, 100))
        assert got[3] == Reply(3)
        assert counts(export).piped_writes == 1
        await budget_returns(s.state)
    assert read_file(path, MiB, MiB) == blob
    assert os.path.getsize(path) == 4 * MiB


async def test_a_payload_completed_while_the_export_is_paused_waits_for_the_resume(
    shm: Path,  # noqa: F811
) -> None:
    """The pipe is only written under the gate: a payload that is whole while the export is
    paused takes the buffer path and lands after the pause, as a buffered one would."""
    path = shm / "disk.img"
    before = make_image(path, 4 * MiB, seed=4)
    blob = os.urandom(2 * MiB)
    async with file_export(path) as export, serving(export, pair=trio_tcp_pair) as s:
        backend = counts(export)
        c = s.client
        async with export.paused():
            backend.paused = True
            await c.send(c.write(1, MiB, blob))
            await wait_until(lambda: s.state.budget.used == 2 * MiB)
            await trio.testing.wait_all_tasks_blocked()
            assert c.holds_nothing()
            assert read_file(path, 0, 4 * MiB) == before
            backend.paused = False
        assert await c.replies(1) == {1: Reply(1)}
        assert backend.calls_while_paused == 0
        await budget_returns(s.state)
    assert read_file(path, MiB, 2 * MiB) == blob


async def test_a_fua_write_takes_the_buffer_path(shm: Path) -> None:  # noqa: F811
    path = shm / "disk.img"
    make_image(path, 4 * MiB, seed=None)
    blob = os.urandom(MiB)
    async with file_export(path) as export, serving(export, pair=trio_tcp_pair) as s:
        c = s.client
        await c.send(c.request(Cmd.WRITE, 1, 0, MiB, flags=CmdFlag.FUA) + blob)
        assert await c.replies(1) == {1: Reply(1)}
        assert counts(export).piped_writes == 0
    assert read_file(path, 0, MiB) == blob


async def test_cow_writes_from_pipes_copy_up_their_edges_and_leave_the_base_alone(
    shm: Path,  # noqa: F811
    ample_pipes: None,
) -> None:
    """cow-target: a large WRITE over absent blocks with partial edges (copied up from the
    base first), one over blocks now present, and one that straddles both: each is written
    from the pipes into the overlay, reads give base + overlay, the base is never written."""
    base = shm / "base.img"
    size = 1024 * BLOCK_SIZE
    original = make_image(base, size, seed=5)
    model = bytearray(original)
    (shm / "cow").mkdir()
    backend = CountingCow.open(str(base), cow_dir=str(shm / "cow"))
    assert isinstance(backend, CountingCow)
    writes = [  # (offset, length): absent with partial edges, present, half and half
        (3 * BLOCK_SIZE + 100, 64 * BLOCK_SIZE),
        (4 * BLOCK_SIZE, 48 * BLOCK_SIZE),
        (40 * BLOCK_SIZE + 7, 256 * BLOCK_SIZE),
    ]
    async with exported(backend) as export, serving(export, pair=trio_tcp_pair) as s:
        c = s.client
        for cookie, (offset, length) in enumerate(writes):
            data = os.urandom(length)
            model[offset : offset + length] = data
            await c.send(c.write(cookie, offset, data))
            assert await c.replies(1) == {cookie: Reply(cookie)}
        await c.send(c.request(Cmd.READ, 99, 0, size))
        assert await c.replies(1) == {99: Reply(99, data=bytes(model))}
        assert backend.piped_writes == len(writes)
        await budget_returns(s.state)
    assert read_file(base, 0, size) == original


async def test_proxy_writes_to_cached_blocks_come_from_pipes_and_others_wait_for_the_origin(
    shm: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A warm proxy splices a large WRITE of cached blocks into its cache; one that touches
    uncached blocks takes the event loop's path (its edges come from the origin first). The
    origin is never written."""
    written: list[int] = []

    class Counted(PayloadPipe):
        def __init__(self) -> None:
            super().__init__(max_pipes=64)

        def write_to(self, fd: int, offset: int) -> None:
            written.append(offset)
            super().write_to(fd, offset)

    monkeypatch.setattr(receive_module, "PayloadPipe", Counted)
    size = 4 * MiB
    image = shm / "origin.img"
    original = random_image(image, size, seed=6)
    model = bytearray(original)
    cached, cold = (0, 2 * MiB), (2 * MiB + 100, MiB)
    with nbdkit(shm, ["file", str(image)]) as origin:
        address = RemoteAddress(origin.host, origin.port)
        proxy_cm = open_proxy_backend(address, str(shm / "cache.img"), str(shm / "cache.bm"))
        async with proxy_cm as proxy:
            await proxy.cache(*cached)
            export = Export("disk", proxy)
            async with serving(export, pair=trio_tcp_pair) as s:
                c = s.client
                for cookie, (offset, length) in enumerate([cached, cold]):
                    data = os.urandom(length)
                    model[offset : offset + length] = data
                    await c.send(c.write(cookie, offset, data))
                    assert await c.replies(1) == {cookie: Reply(cookie)}
                await c.send(c.request(Cmd.READ, 9, 0, size))
                assert await c.replies(1) == {9: Reply(9, data=bytes(model))}
                await budget_returns(s.state)
    assert written == [cached[0]]
    assert read_file(image, 0, size) == original
