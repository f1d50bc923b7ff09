"""The one handshake driver over a real socket pair: it answers the machine's questions through
its host, which may take its time (the wrapper starts an export's server before answering GO)."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable

import trio

from tests.test_connection import socket_pair
from xnbdd.negotiation import Channel, negotiate
from xnbdd.proto.consts import IHAVEOPT, OPTION_REPLY_MAGIC, Info, Opt, Rep, TxFlag
from xnbdd.proto.errors import OptionError
from xnbdd.proto.handshake import ExportRequested, ServerHandshake
from xnbdd.proto.messages import ExportInfo

EXPORT = ExportInfo(name="disk", size=1 << 20, tx_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH)
FIELDS: dict[str, str] = {}


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack("!QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes) -> bytes:
    return struct.pack("!I", len(name)) + name + struct.pack("!HH", 1, Info.NAME)


class SlowHost:
    """Answers only once ``release`` is set; remembers what it was asked."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.asked: list[ExportRequested] = []
        self.stopping = False
        self.refuse: set[int] = set()

    async def find_export(self, event: ExportRequested) -> ExportInfo | None:
        self.asked.append(event)
        await self.release.wait()
        if event.option in self.refuse:
            raise OptionError(Rep.ERR_UNKNOWN, f"export {event.name!r} is not available")
        return EXPORT if event.name == "disk" else None

    def list_exports(self) -> Iterable[ExportInfo]:
        return [EXPORT]

    def shutting_down(self) -> bool:
        return self.stopping

    async def start_tls(self, early: bytes) -> Channel | None:
        raise AssertionError("no TLS here")


async def replies(stream: trio.SocketStream, count: int) -> list[tuple[int, int, bytes]]:
    buf = bytearray()
    out: list[tuple[int, int, bytes]] = []
    while len(out) < count:
        while len(buf) >= 20:
            magic, opt, rep, length = struct.unpack_from("!QIII", buf)
            assert magic == OPTION_REPLY_MAGIC
            if len(buf) < 20 + length:
                break
            out.append((opt, rep, bytes(buf[20 : 20 + length])))
            del buf[: 20 + length]
        if len(out) < count:
            chunk = await stream.receive_some(65536)
            assert chunk, "closed early"
            buf += chunk
    return out


async def greeting(stream: trio.SocketStream) -> None:
    got = b""
    while len(got) < 18:
        got += await stream.receive_some(18 - len(got))


def run(main: Callable[[trio.SocketStream, trio.SocketStream], Awaitable[None]]) -> None:
    async def over_a_socket_pair() -> None:
        client, server = socket_pair()
        async with client, server:
            await main(client, server)

    trio.run(over_a_socket_pair)


def test_a_slow_answer_holds_the_options_behind_it_and_keeps_pipelined_bytes() -> None:
    async def main(client: trio.SocketStream, server: trio.SocketStream) -> None:
        host = SlowHost()
        request = b"\x25\x60\x95\x13" + bytes(24)
        result = None

        async def serve() -> None:
            nonlocal result
            result = await negotiate(ServerHandshake(), server, host, FIELDS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await greeting(client)
            await client.send_all(
                struct.pack("!I", 3)
                + option(Opt.INFO, go_data(b"disk"))
                + option(Opt.GO, go_data(b"disk"))
                + request
            )
            while not host.asked:
                await trio.sleep(0.01)
            assert host.asked == [ExportRequested("disk", Opt.INFO)]  # GO waits behind it
            host.release.set()
            got = await replies(client, 8)
        assert [(opt, rep) for opt, rep, _ in got] == [
            (Opt.INFO, Rep.INFO),
            (Opt.INFO, Rep.INFO),
            (Opt.INFO, Rep.INFO),
            (Opt.INFO, Rep.ACK),
            (Opt.GO, Rep.INFO),
            (Opt.GO, Rep.INFO),
            (Opt.GO, Rep.INFO),
            (Opt.GO, Rep.ACK),
        ]
        assert host.asked == [ExportRequested("disk", Opt.INFO), ExportRequested("disk", Opt.GO)]
        assert result is not None
        negotiated, pending = result
        assert negotiated.export == EXPORT and pending == request

    run(main)


def test_refusals_reach_the_client_and_export_name_closes() -> None:
    async def main(client: trio.SocketStream, server: trio.SocketStream) -> None:
        host = SlowHost()
        host.release.set()
        host.refuse = {Opt.GO, Opt.EXPORT_NAME}
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                assert await negotiate(ServerHandshake(), server, host, FIELDS) is None
                await server.aclose()  # as its callers do

            nursery.start_soon(serve)
            await greeting(client)
            await client.send_all(struct.pack("!I", 3) + option(Opt.GO, go_data(b"disk")))
            got = await replies(client, 1)
            assert got == [(Opt.GO, Rep.ERR_UNKNOWN, b"export 'disk' is not available")]
            await client.send_all(option(Opt.EXPORT_NAME, b"disk"))
            assert await client.receive_some(100) == b""  # EXPORT_NAME has no error: closed

    run(main)


def test_a_stopping_server_refuses_without_asking() -> None:
    async def main(client: trio.SocketStream, server: trio.SocketStream) -> None:
        host = SlowHost()
        host.release.set()
        host.stopping = True
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await negotiate(ServerHandshake(), server, host, FIELDS)

            nursery.start_soon(serve)
            await greeting(client)
            await client.send_all(struct.pack("!I", 3) + option(Opt.GO, go_data(b"disk")))
            got = await replies(client, 1)
            assert got == [(Opt.GO, Rep.ERR_SHUTDOWN, b"server shutting down")]
            assert host.asked == []
            await client.send_all(option(Opt.ABORT))

    run(main)
