"""The hand-off protocol: in-process against receive_handoffs, and against a real xnbd-server."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.serverproc import server_command, server_env
from xnbdd.handoff import (
    HandoffError,
    export_to_json,
    negotiated_from,
    query_export,
    receive_handoffs,
    send_handoff,
)
from xnbdd.listeners import bind_unix
from xnbdd.proto.consts import TxFlag
from xnbdd.proto.messages import ExportInfo, Negotiated

INFO = ExportInfo(
    name="disk",
    size=1 << 20,
    tx_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_DF,
    meta_contexts=("base:allocation",),
)
REQUEST = struct.Struct("!IHHQQI")
SIMPLE_REPLY = struct.Struct("!IIQ")
STRUCTURED_CHUNK = struct.Struct("!IHHQI")


def negotiated(structured: bool) -> Negotiated:
    contexts = {1: "base:allocation"} if structured else {}
    return Negotiated(
        export=INFO, tx_flags=INFO.tx_flags, structured=structured, meta_contexts=contexts
    )


def test_negotiated_state_survives_the_trip() -> None:
    from xnbdd.handoff import handoff_message

    message = json.loads(json.dumps(handoff_message(negotiated(True), b"\x25\x60")))
    rebuilt, pending = negotiated_from(INFO, message)
    assert rebuilt.structured and rebuilt.meta_contexts == {1: "base:allocation"}
    assert rebuilt.tx_flags & TxFlag.SEND_DF
    assert pending == b"\x25\x60"
    simple, _ = negotiated_from(INFO, handoff_message(negotiated(False)))
    assert not simple.tx_flags & TxFlag.SEND_DF and simple.meta_contexts == {}


def test_extended_headers_survive_the_trip() -> None:
    from xnbdd.handoff import handoff_message

    extended = Negotiated(INFO, INFO.tx_flags, True, {1: "base:allocation"}, extended=True)
    message = json.loads(json.dumps(handoff_message(extended)))
    rebuilt, _ = negotiated_from(INFO, message)
    assert rebuilt.extended and rebuilt.structured
    assert rebuilt.tx_flags & TxFlag.BLOCK_STATUS_PAYLOAD  # recomputed: contexts are selected
    del message["extended"]  # a wrapper from before extended headers
    older, _ = negotiated_from(INFO, message)
    assert not older.extended and not older.tx_flags & TxFlag.BLOCK_STATUS_PAYLOAD


async def test_handoff_and_query_in_process(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sock")
    listener = bind_unix(path, mode=0o600)
    received: list[tuple[socket.socket, dict[str, object]]] = []

    async def serve() -> None:
        async for client, message in receive_handoffs(listener, lambda: export_to_json(INFO)):
            received.append((client, message))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        answer = await trio.to_thread.run_sync(query_export, path)
        assert answer["export"]["size"] == 1 << 20 and answer["pid"] > 0
        ours, theirs = socket.socketpair()
        answer = await trio.to_thread.run_sync(send_handoff, path, theirs, negotiated(True))
        theirs.close()
        assert answer["ok"] is True
        await trio.sleep(0.05)
        ((client, message),) = received
        assert message["export"] == "disk" and message["structured"] is True
        client.sendall(b"ping")  # the received descriptor is the other end of our pair
        assert ours.recv(4) == b"ping"
        client.close()
        ours.close()
        nursery.cancel_scope.cancel()
    assert not Path(path).exists(), "the socket file goes with the listener"


async def test_bad_messages_are_refused_and_nothing_is_yielded(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sock")
    listener = bind_unix(path, mode=0o600)
    received: list[object] = []

    async def serve() -> None:
        async for item in receive_handoffs(listener, lambda: export_to_json(INFO)):
            received.append(item)

    def raw(line: bytes) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(line)
            reply = s.makefile("rb").readline()
        answer: dict[str, object] = json.loads(reply)
        return answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        for line in (b'{"version": 9}\n', b'{"version": 1, "export": "disk"}\n'):
            answer = await trio.to_thread.run_sync(raw, line)
            assert answer["ok"] is False, line
        with pytest.raises(HandoffError, match=r"(?i)no such file"):
            await trio.to_thread.run_sync(query_export, str(tmp_path / "missing"))
        nursery.cancel_scope.cancel()
    assert received == []


@pytest.fixture
def handoff_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)
    path = str(tmp_path / "export.sock")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        server_command("--target", str(image), "--exportname", "disk", "--handoff-socket", path),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=server_env(),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                query_export(path)
                break
            except HandoffError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "hand-off socket never answered"
                time.sleep(0.05)
        assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
        yield path, image
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, (tmp_path / "server.log").read_text()
        log.close()
    assert not Path(path).exists()


def test_real_server_continues_with_structured_replies(handoff_server: tuple[str, Path]) -> None:
    path, image = handoff_server
    answer = query_export(path)
    assert answer["export"]["name"] == "disk"
    assert answer["export"]["size"] == image.stat().st_size
    client, theirs = socket.socketpair()
    # The first READ travels as bytes the wrapper already took off the wire ("pending").
    read = REQUEST.pack(0x25609513, 0, 0, 7, 4096, 16)
    send_handoff(path, theirs, negotiated(True), pending=read)
    theirs.close()
    client.settimeout(10)
    header = recv_exact(client, STRUCTURED_CHUNK.size)
    magic, _flags, _kind, cookie, length = STRUCTURED_CHUNK.unpack(header)
    assert (magic, cookie) == (0x668E33EF, 7), "a structured reply, as negotiated"
    payload = recv_exact(client, length)
    assert payload[8:] == image.read_bytes()[4096:4112]
    client.sendall(REQUEST.pack(0x25609513, 0, 2, 0, 0, 0))  # DISC
    client.close()


def test_real_server_continues_with_extended_headers(handoff_server: tuple[str, Path]) -> None:
    path, image = handoff_server
    client, theirs = socket.socketpair()
    extended = Negotiated(INFO, INFO.tx_flags, True, {1: "base:allocation"}, extended=True)
    send_handoff(path, theirs, extended)
    theirs.close()
    client.settimeout(10)
    client.sendall(struct.pack("!IHHQQQ", 0x21E41C71, 0, 0, 5, 200, 8))  # an extended READ
    head = recv_exact(client, 32)
    magic, _flags, kind, cookie, offset, length = struct.unpack("!IHHQQQ", head)
    assert (magic, kind, cookie, offset, length) == (0x6E8A278C, 1, 5, 200, 16)
    assert recv_exact(client, length)[8:] == image.read_bytes()[200:208]
    client.close()


def test_real_server_simple_replies(handoff_server: tuple[str, Path]) -> None:
    path, image = handoff_server
    client, theirs = socket.socketpair()
    send_handoff(path, theirs, negotiated(False))
    theirs.close()
    client.settimeout(10)
    client.sendall(REQUEST.pack(0x25609513, 0, 0, 9, 100, 8))
    magic, error, cookie = SIMPLE_REPLY.unpack(recv_exact(client, SIMPLE_REPLY.size))
    assert (magic, error, cookie) == (0x67446698, 0, 9)
    assert recv_exact(client, 8) == image.read_bytes()[100:108]
    client.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data
