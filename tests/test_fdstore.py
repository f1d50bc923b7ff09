"""Handing clients to systemd's file-descriptor store and taking them back (``xnbdd/fdstore.py``).

A real notify socket stands in for systemd: it keeps the descriptors that come with FDSTORE=1 (as
systemd does), so the test can look into the handed-over socket and give it to the next
"process" the way systemd passes it back (fd + name). The data plane runs for real on a unix
socket pair (``Connection.serve``), the messages go out through python-systemd's notify.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import termios
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import Manager
from tests.test_connection import OneExport, socket_pair, wait_until
from tests.test_dataplane import Client, negotiated_for
from xnbdd.backends.file import FileBackend
from xnbdd.connection import Connection, ServerState
from xnbdd.export import Export
from xnbdd.fdstore import CLIENT_PREFIX, STATE_NAME, FdStore, take_stored
from xnbdd.handoff import negotiated_from
from xnbdd.proto.consts import Cmd

TIMEOUT = 10.0


def unread(fd: int) -> int:
    """Bytes waiting in the socket's receive queue."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    count: int = struct.unpack("i", raw)[0]
    return count


@pytest.mark.parametrize(
    ("offset", "size", "sent"),
    [
        (8192, 4096, 2000),  # a small WRITE: half of it in the receive buffer
        # a large one, partly in its payload buffer, at an offset equal to the payload bytes
        # read so far (the two must not be confused)
        (65 * 4096, 1 << 20, 28 + 65 * 4096),
    ],
)
async def test_a_stop_hands_over_at_a_request_boundary(
    manager: Manager, tmp_path: Path, offset: int, size: int, sent: int
) -> None:
    """Part of a WRITE is in the plane's buffer when the stop comes: the plane reads exactly the
    rest, answers it, and hands the socket over with the next request still unread in it. The
    next process takes it back (fd + name + state) and answers that request."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(2 << 20))
    export = Export("disk", FileBackend.open(str(image), readonly=False))
    store = FdStore.from_environment()
    assert store.enabled
    state = ServerState()
    client_end, server_end = socket_pair()
    client = Client(client_end)
    conn = Connection(server_end, OneExport(export), state, keeper=store.keeper())
    payload = os.urandom(size)
    write = client.write(1, offset, payload)
    next_read = client.request(Cmd.READ, 2, offset, 4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, negotiated_for(export, True))
        await client.send(write[:sent])
        await wait_until(
            lambda: unread(server_end.socket.fileno()) == 0
        )  # in the plane's buffer now
        state.handover = True
        state.stopping.set()
        await trio.testing.wait_all_tasks_blocked()  # the connection told its plane
        await client.send(write[sent:] + next_read)  # one segment: the plane could read both
        reply = await client.reply()
        assert reply.cookie == 1 and reply.error == 0
    store.commit()  # as the daemon does after its last connection
    await client_end.aclose()
    assert image.read_bytes()[offset : offset + size] == payload

    held = manager.stored()
    name = next(n for n in held if n.startswith(CLIENT_PREFIX))
    assert set(held) == {name, STATE_NAME}
    # What systemd passes to the next process: the client, then the state, by name.
    handover, rest = take_stored([(held[name], name), (held[STATE_NAME], STATE_NAME), (99, "x")])
    stored = handover.clients
    assert rest == [(99, "x")]
    assert [s.name for s in stored] == [name]
    assert unread(stored[0].sock.fileno()) == len(next_read)  # nothing of the next request was read
    negotiated, pending = negotiated_from(export.info(), stored[0].message)
    assert negotiated.structured and pending == b""
    assert stored[0].message["tx_flags"] == int(negotiated.tx_flags)
    stored[0].sock.close()
    await export.backend.close()


async def test_adopted_client_is_served_and_leaves_the_store(
    manager: Manager, tmp_path: Path
) -> None:
    """A stored client is served on; the store is emptied as it is adopted (a crash of this
    process must close it, not pass it on with requests nobody will answer)."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    export = Export("disk", FileBackend.open(str(image), readonly=False))
    ours, theirs = socket.socketpair()
    name = f"{CLIENT_PREFIX}1-1"
    state_fd = os.memfd_create("state")
    message = {"version": 1, "export": "disk", "structured": False, "meta_contexts": {}}
    os.write(state_fd, json.dumps({"version": 1, "clients": {name: message}}).encode())
    handover, _rest = take_stored([(theirs.detach(), name), (state_fd, STATE_NAME)])
    removed = [f["FDNAME"] for f, _fds in manager.take() if f.get("FDSTOREREMOVE") == "1"]
    assert sorted(removed) == sorted([name, STATE_NAME])
    store = FdStore.from_environment()
    stored = handover.clients
    negotiated, pending = negotiated_from(export.info(), stored[0].message)
    client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    server = trio.SocketStream(trio.socket.from_stdlib_socket(stored[0].sock))
    conn = Connection(server, OneExport(export), ServerState(), keeper=store.keeper(name))
    conn.pending = pending
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, negotiated)
        await client.send(client.request(Cmd.READ, 7, 4096, 512))
        reply = await client.reply()
        assert reply.cookie == 7 and reply.data == image.read_bytes()[4096 : 4096 + 512]
        await client.send(client.request(Cmd.DISC, 8))
    await client.stream.aclose()
    assert len(manager.take()) == 2  # nothing more was sent: a disconnect is not a handover
    await export.backend.close()


def test_a_stored_client_without_state_is_closed_and_removed(manager: Manager) -> None:
    ours, theirs = socket.socketpair()
    name = f"{CLIENT_PREFIX}1-2"
    handover, rest = take_stored([(theirs.detach(), name)])
    assert handover.clients == [] and rest == []
    assert ours.recv(1) == b""  # closed: the client sees end of stream
    ours.close()
    removed = [f["FDNAME"] for f, _fds in manager.take() if f.get("FDSTOREREMOVE") == "1"]
    assert removed == [name]


def test_no_store_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("FDSTORE", "16")
    assert not FdStore.from_environment().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("FDSTORE", "0")
    assert not FdStore.from_environment().enabled
