"""Listening sockets handed to trio, and the peer-credential check of local sockets."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import pytest
import trio

from xnbdd.listeners import PatientListener, bind_tcp, bind_unix, peer_allowed, peer_uid


async def close(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def test_patient_listener_outlasts_an_error_serve_listeners_stops_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listening TCP socket shut down for reading fails accept(2) with EINVAL: trio's own
    accept loop ends the server with it; ours logs it, pauses and tries again."""
    (plain,) = bind_tcp(["127.0.0.1"], 0)
    trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(plain))
    plain.shutdown(socket.SHUT_RD)
    with pytest.raises(ExceptionGroup) as caught:
        await trio.serve_listeners(close, [trio_listener])
    assert caught.group_contains(OSError, match="Invalid argument")
    await trio_listener.aclose()

    (sock,) = bind_tcp(["127.0.0.1"], 0)
    listener = PatientListener(sock)
    sock.shutdown(socket.SHUT_RD)

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("accept failed")]

    with caplog.at_level(logging.WARNING, logger="xnbdd"), trio.fail_after(30):
        async with trio.open_nursery() as nursery:  # a failed serve_listeners would raise here
            nursery.start_soon(trio.serve_listeners, close, [listener])
            while len(failures()) < 2:  # it paused and tried again
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    await listener.aclose()
    assert all(getattr(r, "XNBD_ERRNO", None) == str(errno.EINVAL) for r in failures())


async def test_patient_listener_serves_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    served: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        served.append(await stream.receive_some(100))

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [PatientListener(bind_unix(path))])
        client = await trio.open_unix_socket(path)
        await client.send_all(b"hello")
        await client.aclose()
        while not served:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert served == [b"hello"]


def test_peer_credentials_are_those_of_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.geteuid()
        assert peer_allowed(a)
