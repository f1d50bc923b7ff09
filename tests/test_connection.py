"""One connection over a real socket pair (the path production uses: the data-plane thread
reads and writes the socket itself), with a real file backend behind it."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xnbdd.backends.file import FileBackend
from xnbdd.budget import Limits
from xnbdd.connection import Connection, ServerState
from xnbdd.export import Export
from xnbdd.proto.consts import REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd, Errno, TxFlag
from xnbdd.proto.messages import Negotiated

SIZE = 1 << 20


class OneExport:
    def __init__(self, export: Export) -> None:
        self.export = export

    def lookup(self, name: str) -> Export | None:
        return self.export

    def exports(self) -> Sequence[Export]:
        return [self.export]


def request(
    cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack("!IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


class Reader:
    """Reads simple replies off the client end of the memory stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def reply(self, read_lengths: dict[int, int]) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack("!IIQ", await self.take(16))
        assert magic == SIMPLE_REPLY_MAGIC
        data = await self.take(read_lengths.get(cookie, 0)) if error == 0 else b""
        return error, cookie, data


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Client and server ends of a connected unix socket pair."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def make_export(tmp: Path) -> Export:
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return Export("disk", FileBackend.open(str(path), readonly=False))


def negotiated_for(export: Export) -> Negotiated:
    info = export.info()
    return Negotiated(export=info, tx_flags=info.tx_flags & ~TxFlag.SEND_DF)


requests_strategy = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 42]),  # commands, some invalid
        st.integers(0, 0x3F),  # flags, some invalid
        st.integers(0, SIZE + 8192),  # offset, some beyond the end
        st.integers(0, 8192),  # length
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests_strategy)
def test_valid_framing_never_closes_and_every_request_is_answered(
    tmp_path: Path, reqs: list[tuple[int, int, int, int]]
) -> None:
    """docs/protocol-rules.md rule 49: whatever valid-framed requests arrive, each gets one
    reply, the stream stays in step and the connection stays open."""

    async def main() -> None:
        export = make_export(tmp_path)
        client, server = socket_pair()
        conn = Connection(server, OneExport(export), ServerState())
        read_lengths: dict[int, int] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.serve, negotiated_for(export))
            payload = b""
            for cookie, (cmd, flags, offset, length) in enumerate(reqs):
                data = os.urandom(length) if cmd == Cmd.WRITE else b""
                if cmd == Cmd.READ:
                    read_lengths[cookie] = length
                payload += request(cmd, cookie, offset, length, flags, data)
            payload += request(Cmd.READ, 10_000, 0, 16)  # the probe after everything
            read_lengths[10_000] = 16
            await client.send_all(payload)
            reader = Reader(client)
            seen = set()
            for _ in range(len(reqs) + 1):
                error, cookie, data = await reader.reply(read_lengths)
                assert cookie not in seen
                seen.add(cookie)
                if error == 0 and cookie in read_lengths:
                    assert len(data) == read_lengths[cookie]
                assert error in {0, *map(int, Errno)}
            assert seen == {*range(len(reqs)), 10_000}
            await client.send_all(request(Cmd.DISC, 99))
            assert await client.receive_some(1) == b""  # DISC: closed, no reply
            nursery.cancel_scope.cancel()
        await client.aclose()
        await export.backend.close()

    trio.run(main)


async def test_backpressure_stops_reading_at_the_request_limit(tmp_path: Path) -> None:
    """With --max-queue-size 2 and the export paused, the server admits two requests and
    takes no more while they wait; once the export resumes every request is answered and the
    budget is all given back."""
    export = make_export(tmp_path)
    client, server = socket_pair()
    state = ServerState(Limits(max_requests=2))
    conn = Connection(server, OneExport(export), state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, negotiated_for(export))
        async with export.paused():
            await client.send_all(b"".join(request(Cmd.READ, i, 0, 512) for i in range(10)))
            await wait_until(lambda: state.budget.requests == 2)
            await trio.sleep(0.2)
            assert state.budget.requests == 2  # nothing more is admitted while they wait
        reader = Reader(client)
        cookies = {(await reader.reply({i: 512 for i in range(10)}))[1] for _ in range(10)}
        assert cookies == set(range(10))
        await wait_until(lambda: state.budget.requests == 0 and state.budget.used == 0)
        nursery.cancel_scope.cancel()
    await client.aclose()
    await export.backend.close()


async def test_shutdown_answers_new_requests_with_eshutdown(tmp_path: Path) -> None:
    export = make_export(tmp_path)
    client, server = socket_pair()
    state = ServerState(Limits(shutdown_grace=0.5))
    conn = Connection(server, OneExport(export), state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, negotiated_for(export))
        async with export.paused():
            await client.send_all(request(Cmd.READ, 1, 0, 512))
            await wait_until(lambda: state.budget.requests == 1)
            state.stopping.set()
            await trio.testing.wait_all_tasks_blocked()  # the connection has seen the stop
            await client.send_all(request(Cmd.READ, 2, 0, 512))
            await trio.sleep(0.1)
        reader = Reader(client)
        replies = {
            cookie: error
            for error, cookie, _d in [await reader.reply({1: 512, 2: 512}) for _ in range(2)]
        }
        assert replies == {1: 0, 2: Errno.ESHUTDOWN}  # in flight finished, new one refused
        with trio.fail_after(5):
            assert await client.receive_some(1) == b""  # then the server hangs up
    await client.aclose()
    await export.backend.close()


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Client and server ends of a loopback TCP connection, as trio makes them (trio sets
    TCP_NODELAY and a 16 KiB TCP_NOTSENT_LOWAT on both)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(client), trio.SocketStream(server)


async def test_transmission_lifts_trios_cap_on_unsent_bytes(tmp_path: Path) -> None:
    """Past the handshake the server's socket may hold unsent replies whole: trio's 16 KiB
    TCP_NOTSENT_LOWAT made 1 MiB reads go out in half-empty segments (0.63x nbdkit)."""
    export = make_export(tmp_path)
    client, server = await tcp_pair()
    lowat = (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert server.socket.getsockopt(*lowat) == 16384  # what trio sets
    conn = Connection(server, OneExport(export), ServerState(Limits()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, negotiated_for(export))
        await client.send_all(request(Cmd.READ, 1, 0, SIZE))
        assert await Reader(client).reply({1: SIZE}) == (0, 1, bytes(SIZE))
        assert server.socket.getsockopt(*lowat) == 0  # the system's default: no cap
        nursery.cancel_scope.cancel()
    await client.aclose()
    await export.backend.close()
