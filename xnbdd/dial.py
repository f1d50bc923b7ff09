"""Reaching an origin NBD server: the socket (TCP or a unix path), TLS, the handshake.

``remote.RemoteLink`` keeps a connection made here alive and moves its requests.
"""

from __future__ import annotations

import errno
import socket
from contextlib import suppress
from dataclasses import dataclass

import trio

from .listeners import STREAM_ERRORS, STREAM_GONE
from .proto.client import ClientHandshake, Connected
from .proto.errors import NBDError
from .tls import ClientTLSOptions, client_context

RECEIVE_SIZE = 256 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0


@dataclass(frozen=True)
class RemoteAddress:
    """Where the origin is. A ``host`` starting with ``/`` is a unix socket path (port unused).
    ``export_name`` None: oldstyle servers need none, newstyle ones get the default export "".
    ``tls``: negotiate STARTTLS and verify the origin's certificate (its name for TCP too)."""

    host: str
    port: str = "8520"
    export_name: str | None = None
    tls: ClientTLSOptions | None = None

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def describe(self) -> str:
        where = f"unix:{self.host}" if self.is_unix else f"{self.host}:{self.port}"
        if self.tls is not None:
            where += " (TLS)"
        return where if self.export_name is None else f"{where} export {self.export_name!r}"


async def close_quietly(stream: trio.abc.Stream) -> None:
    # A TLS stream sends close_notify first, which a stuck origin may never take: bounded (a
    # cancelled close still closes the socket).
    with suppress(*STREAM_ERRORS):
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()


def _tune_socket(stream: trio.SocketStream) -> None:
    sock = stream.socket
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # notice a silently vanished origin within about half a minute, not two hours
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def _port_number(port: str) -> int:
    try:
        return int(port)
    except ValueError:
        return socket.getservbyname(port, "tcp")


async def _start_tls(
    raw: trio.SocketStream, address: RemoteAddress, tls: ClientTLSOptions
) -> trio.SSLStream[trio.SocketStream]:
    hostname = None if address.is_unix else address.host
    context = client_context(ClientTLSOptions(tls.ca, tls.cert, tls.key, server_hostname=hostname))
    stream = trio.SSLStream(raw, context, server_hostname=hostname)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        # the certificate did not verify, or the origin is not speaking TLS
        cause = exc.__cause__ or exc
        raise OSError(errno.EPROTO, f"{address.describe()}: TLS handshake failed: {cause}") from exc
    return stream


async def open_connection(
    address: RemoteAddress,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,  # noqa: ASYNC109 (raises OSError, not Cancelled)
) -> tuple[trio.abc.Stream, Connected, bytes]:
    """Connect (every resolved address is tried) and negotiate; OSError on any failure."""
    with trio.move_on_after(timeout) as scope:
        stream: trio.abc.Stream
        if address.is_unix:
            stream = raw = await trio.open_unix_socket(address.host)
        else:
            stream = raw = await trio.open_tcp_stream(address.host, _port_number(address.port))
        try:
            _tune_socket(raw)
            handshake = ClientHandshake(
                address.export_name or "", starttls=bool(address.tls), allocation=True
            )
            result = None
            while result is None:
                data = await stream.receive_some(RECEIVE_SIZE)
                result = handshake.receive_data(data)
                outgoing = handshake.data_to_send()
                if outgoing:
                    await stream.send_all(outgoing)
                if handshake.wants_tls:
                    assert address.tls is not None
                    stream = await _start_tls(raw, address, address.tls)
                    handshake.tls_started()
                    await stream.send_all(handshake.data_to_send())
            return stream, result, handshake.leftover()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await close_quietly(stream)
            if isinstance(exc, NBDError):
                raise OSError(errno.EPROTO, f"{address.describe()}: {exc}") from exc
            if isinstance(exc, STREAM_GONE):
                raise OSError(errno.ECONNRESET, f"{address.describe()}: {exc!r}") from exc
            raise
    assert scope.cancelled_caught
    raise OSError(errno.ETIMEDOUT, f"{address.describe()}: no handshake within {timeout}s")
