"""TLS in-process: a real ``Connection`` over a real socket pair, the client speaking STARTTLS
and then TLS with the ssl module (``trio.SSLStream``), so the handshake on the event loop and the
data plane's ``TLSTransport`` in its thread are checked as a TLS client sees them. The
``TLSTransport`` alone is driven over a socket pair whose buffers are small, so it has to hold
ciphertext back and flush it as the peer reads.

Certificates come from the openssl command (tests/tlscerts.py)."""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import Manager
from tests.test_connection import OneExport, socket_pair, wait_until
from tests.tlscerts import Certificates, make_certificates
from xnbdd.backends.file import FileBackend
from xnbdd.connection import Connection, ServerState
from xnbdd.export import Export
from xnbdd.fdstore import CLIENT_PREFIX, ClientKeeper, FdStore
from xnbdd.proto.consts import IHAVEOPT, NBDMAGIC, Errno, Opt, Rep
from xnbdd.proto.handshake import TLSPolicy
from xnbdd.tls import (
    ClientTLSOptions,
    ServerTLS,
    ServerTLSOptions,
    TLSConfigError,
    TLSSession,
    TLSTransport,
    client_context,
    server_context,
    server_tls,
)

MiB = 1 << 20
SIZE = 16 * MiB
TIMEOUT = 20.0
OPTION = struct.Struct("!QII")
REPLY = struct.Struct("!QIII")
REQUEST = struct.Struct("!IHHQQI")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def server_state(
    certs: Certificates, policy: TLSPolicy, *, verify_peer: bool = False
) -> ServerState:
    opts = ServerTLSOptions(policy, str(certs.server), verify_peer=verify_peer)
    return ServerState(tls=server_tls(opts))


def client_ctx(directory: Path | None, certs: Certificates) -> ssl.SSLContext:
    cert = key = ""
    if directory is not None:
        cert, key = str(directory / "client-cert.pem"), str(directory / "client-key.pem")
    return client_context(
        ClientTLSOptions(str(certs.ca_file), cert, key, server_hostname="localhost")
    )


class Wire:
    """A tiny client over a trio stream: exact reads, option replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        await self.stream.send_all(OPTION.pack(IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            _magic, _opt, rep, length = REPLY.unpack(await self.recv(REPLY.size))
            replies.append((rep, await self.recv(length)))
            if rep == Rep.ACK or rep & 0x80000000:
                return replies


def go_data(name: bytes = b"") -> bytes:
    return struct.pack("!I", len(name)) + name + struct.pack("!H", 0)


@asynccontextmanager
async def serving(
    tmp_path: Path, state: ServerState, keeper: ClientKeeper | None = None
) -> AsyncIterator[tuple[Wire, Connection, Path]]:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    export = Export("disk", FileBackend.open(str(path), readonly=False))
    client, server = socket_pair()
    conn = Connection(server, OneExport(export), state, keeper=keeper)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.serve)
            wire = Wire(client)
            greeting = await wire.recv(18)
            assert greeting[:8] == struct.pack("!Q", NBDMAGIC)
            await client.send_all(struct.pack("!I", 3))  # fixed newstyle, no zeroes
            yield wire, conn, path
            nursery.cancel_scope.cancel()
    await wire.stream.aclose()
    await export.backend.close()


async def start_tls(wire: Wire, ctx: ssl.SSLContext) -> None:
    assert await wire.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
    assert not wire.buf
    tls = trio.SSLStream(wire.stream, ctx, server_hostname="localhost")
    await tls.do_handshake()
    wire.stream = tls


async def test_data_plane_serves_reads_and_writes_inside_tls(
    tmp_path: Path, certs: Certificates
) -> None:
    state = server_state(certs, TLSPolicy.REQUIRE)
    async with serving(tmp_path, state) as (wire, _conn, path):
        assert (await wire.option(Opt.GO, go_data()))[0][0] == Rep.ERR_TLS_REQD
        await start_tls(wire, client_ctx(certs.client, certs))
        replies = await wire.option(Opt.GO, go_data())
        assert replies[-1][0] == Rep.ACK
        assert state.tls_clients == 1
        rng = random.Random(12)
        data = rng.randbytes(8 * MiB)
        # pipelined: 1 MiB writes (large payloads), then reads of mixed sizes, some 4 KiB
        writes = b"".join(
            REQUEST.pack(0x25609513, 0, 1, i, i * MiB, MiB) + data[i * MiB : (i + 1) * MiB]
            for i in range(8)
        )
        await wire.stream.send_all(writes)
        done = set()  # replies may come in any order (a write the page cache cannot take
        for _ in range(8):  # at once goes to the event loop)
            magic, error, cookie = struct.unpack("!IIQ", await wire.recv(16))
            assert (magic, error) == (0x67446698, 0)
            done.add(cookie)
        assert done == set(range(8))
        assert path.read_bytes()[: 8 * MiB] == data
        reads = [
            (rng.randrange(0, 8 * MiB - MiB), rng.choice([4096, 65536, MiB])) for _ in range(64)
        ]
        await wire.stream.send_all(
            b"".join(
                REQUEST.pack(0x25609513, 0, 0, 100 + n, off, ln)
                for n, (off, ln) in enumerate(reads)
            )
        )
        waiting = {100 + n: read for n, read in enumerate(reads)}
        while waiting:
            magic, error, cookie = struct.unpack("!IIQ", await wire.recv(16))
            assert (magic, error) == (0x67446698, 0)
            off, ln = waiting.pop(cookie)
            assert await wire.recv(ln) == data[off : off + ln]
        await wire.stream.send_all(REQUEST.pack(0x25609513, 0, 2, 0, 0, 0))  # DISC
        assert await wire.stream.receive_some(1) == b""  # close_notify after the last reply


async def test_starttls_then_on_serves_the_clear_client_too(
    tmp_path: Path, certs: Certificates
) -> None:
    async with serving(tmp_path, server_state(certs, TLSPolicy.ON)) as (wire, conn, _path):
        replies = await wire.option(Opt.GO, go_data())
        assert replies[-1][0] == Rep.ACK and conn.tls is None


async def test_verify_peer_refuses_a_client_without_a_certificate(
    tmp_path: Path, certs: Certificates
) -> None:
    state = server_state(certs, TLSPolicy.REQUIRE, verify_peer=True)
    async with serving(tmp_path, state) as (wire, conn, _path):
        with pytest.raises((trio.BrokenResourceError, EOFError)):
            # TLS 1.3: the client's handshake may end before the server has judged it; the
            # refusal then arrives at the first read.
            await start_tls(wire, client_ctx(None, certs))
            await wire.option(Opt.GO, go_data())
        assert conn.tls is None and state.tls_clients == 0


async def test_verify_peer_refuses_a_certificate_of_another_ca(
    tmp_path: Path, certs: Certificates
) -> None:
    state = server_state(certs, TLSPolicy.REQUIRE, verify_peer=True)
    async with serving(tmp_path, state) as (wire, conn, _path):
        with pytest.raises((trio.BrokenResourceError, EOFError)):
            await start_tls(wire, client_ctx(certs.root / "stranger", certs))
            await wire.option(Opt.GO, go_data())
        assert conn.tls is None


async def test_verify_peer_accepts_a_signed_client(tmp_path: Path, certs: Certificates) -> None:
    state = server_state(certs, TLSPolicy.REQUIRE, verify_peer=True)
    async with serving(tmp_path, state) as (wire, conn, _path):
        await start_tls(wire, client_ctx(certs.client, certs))
        assert (await wire.option(Opt.GO, go_data()))[-1][0] == Rep.ACK
        assert conn.tls is not None


async def test_a_client_that_is_not_speaking_tls_after_the_ack_is_dropped(
    tmp_path: Path, certs: Certificates
) -> None:
    async with serving(tmp_path, server_state(certs, TLSPolicy.REQUIRE)) as (wire, conn, _path):
        assert await wire.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
        await wire.stream.send_all(OPTION.pack(IHAVEOPT, Opt.GO, 6) + go_data())
        with pytest.raises(EOFError):
            await wire.recv(1)
        assert conn.tls is None


# -- the transport alone ---------------------------------------------------------------------


def tls_pair(certs: Certificates) -> tuple[TLSTransport, ssl.SSLSocket, socket.socket]:
    """A handshaken TLSTransport on one end of a TCP-like pair, an ssl socket on the other."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    session = TLSSession(server_context(ServerTLSOptions(TLSPolicy.ON, str(certs.server))))
    ctx = client_ctx(None, certs)
    client: list[ssl.SSLSocket] = []
    t = threading.Thread(
        target=lambda: client.append(ctx.wrap_socket(b, server_hostname="localhost"))
    )
    t.start()
    while True:  # the server side of the handshake, by hand over the blocking socket
        try:
            session.obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            a.sendall(session.outgoing.read())
            session.feed(a.recv(65536))
    a.sendall(session.outgoing.read())
    t.join(TIMEOUT)
    a.setblocking(False)
    return TLSTransport(a.fileno(), session), client[0], a


def test_transport_holds_ciphertext_back_and_flushes_it_as_the_peer_reads(
    certs: Certificates,
) -> None:
    transport, client, raw = tls_pair(certs)
    payload = os.urandom(4 * MiB)
    received = bytearray()

    def read_all() -> None:
        while len(received) < len(payload):
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    sent = 0
    view = memoryview(payload)
    reader_started = False
    while sent < len(payload):
        try:
            sent += transport.writev([view[sent : sent + MiB]])
        except BlockingIOError:
            assert transport.has_output()  # the socket is full: ciphertext waits here
            if not reader_started:
                reader.start()
                reader_started = True
            select_writable(raw)
    while not transport.flush():
        select_writable(raw)
    reader.join(TIMEOUT)
    assert bytes(received) == payload
    client.close()
    raw.close()


def test_transport_reads_what_the_peer_sends_and_sees_its_end(certs: Certificates) -> None:
    transport, client, raw = tls_pair(certs)
    client.sendall(b"hello" * 1000)
    buf = bytearray(1 << 20)
    got = 0
    while got < 5000:
        select_readable(raw)
        try:
            got += transport.readv([memoryview(buf)[got:]])
        except BlockingIOError:
            continue
    assert bytes(buf[:got]) == b"hello" * 1000
    with pytest.raises(BlockingIOError):
        transport.readv([memoryview(buf)])
    client.shutdown(socket.SHUT_WR)  # end of stream without close_notify (a crashed peer)
    select_readable(raw)
    assert transport.readv([memoryview(buf)]) == 0
    client.close()
    raw.close()


def select_writable(sock: socket.socket) -> None:
    import select

    select.select([], [sock], [], TIMEOUT)


def select_readable(sock: socket.socket) -> None:
    import select

    select.select([sock], [], [], TIMEOUT)


# -- configuration ------------------------------------------------------------------------------


def test_missing_certificates_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"cannot load server-cert\.pem"):
        server_tls(ServerTLSOptions(TLSPolicy.REQUIRE, str(tmp_path)))
    with pytest.raises(TLSConfigError, match="needs --tls-certificates"):
        server_tls(ServerTLSOptions(TLSPolicy.ON))
    with pytest.raises(TLSConfigError, match="--tls is off"):
        server_tls(ServerTLSOptions(TLSPolicy.OFF, str(tmp_path)))


def test_verify_peer_needs_the_ca(tmp_path: Path, certs: Certificates) -> None:
    for name in ("server-cert.pem", "server-key.pem"):
        (tmp_path / name).write_bytes((certs.server / name).read_bytes())
    with pytest.raises(TLSConfigError, match="tls-verify-peer"):
        server_tls(ServerTLSOptions(TLSPolicy.ON, str(tmp_path), verify_peer=True))
    assert server_tls(ServerTLSOptions(TLSPolicy.ON, str(tmp_path))).policy is TLSPolicy.ON


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="this Python's ssl has PSK support")
def test_psk_without_ssl_support_fails_with_the_reason(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "00" * 32 + "\n")
    with pytest.raises(TLSConfigError, match="no pre-shared key support"):
        server_tls(ServerTLSOptions(TLSPolicy.REQUIRE, psk_file=str(keys)))


def test_server_tls_object_off_has_no_context() -> None:
    assert server_tls(ServerTLSOptions()) == ServerTLS()


async def test_a_restart_closes_a_tls_client_instead_of_handing_it_over(
    tmp_path: Path, certs: Certificates, manager: Manager
) -> None:
    """The TLS session lives in this process: a restart that hands plain clients to systemd's
    fd store treats a TLS client as at a stop (the request in flight is answered, a new one gets
    ESHUTDOWN, the client reconnects) and stores nothing of it, which would leave the next
    process reading ciphertext."""
    state = server_state(certs, TLSPolicy.REQUIRE)
    store = FdStore.from_environment()
    assert store.enabled
    async with serving(tmp_path, state, store.keeper()) as (wire, conn, _path):
        await start_tls(wire, client_ctx(certs.client, certs))
        assert (await wire.option(Opt.GO, go_data()))[-1][0] == Rep.ACK
        export = conn.catalog.lookup("disk")
        assert export is not None
        async with export.paused():  # request 7 stays in flight while the stop comes
            await wire.stream.send_all(REQUEST.pack(0x25609513, 0, 0, 7, 0, 4096))
            await wait_until(lambda: state.budget.requests == 1)
            state.handover = True
            state.stopping.set()
            await trio.testing.wait_all_tasks_blocked()  # the connection has seen the stop
            await wire.stream.send_all(REQUEST.pack(0x25609513, 0, 0, 8, 0, 4096))
            assert struct.unpack("!IIQ", await wire.recv(16)) == (
                0x67446698,
                Errno.ESHUTDOWN,
                8,
            )
        assert struct.unpack("!IIQ", await wire.recv(16)) == (0x67446698, 0, 7)
        assert await wire.recv(4096) == bytes(4096)
    store.commit()
    assert not [name for name in manager.stored() if name.startswith(CLIENT_PREFIX)]
