"""Sockets: listening ones bound here synchronously (so start-up errors surface before the event
loop and before ``--daemonize`` detaches) or inherited from systemd, then handed to trio; who is
at the other end of a connection (its name, its credentials); how a stream says its peer left."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct

import trio

log = logging.getLogger("xnbdd")

BACKLOG = socket.SOMAXCONN
ACCEPT_ERROR_PAUSE = 0.1  # out of fds and the like: pause accepting rather than spin
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# A stream whose peer went away (or that we closed) raises one of these.
STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
# ... and one on a socket can fail with an OSError besides.
STREAM_ERRORS = (OSError, *STREAM_GONE)


def bind_tcp(addresses: list[str], port: int) -> list[socket.socket]:
    """Listening TCP sockets on ``addresses`` (hosts or literals); none given: every IPv4 and
    IPv6 address. IPv6 sockets are V6ONLY so both families can share the port."""
    hosts: list[str | None] = list(addresses) or [None]
    sockets: list[socket.socket] = []
    seen: set[tuple[int, tuple[object, ...]]] = set()
    try:
        for host in hosts:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, addr in infos:
                key = (family, tuple(addr))
                if key in seen:
                    continue
                seen.add(key)
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as err:
                    host_text, port_number = str(addr[0]), int(addr[1])
                    if family == socket.AF_INET6:
                        host_text = f"[{host_text}]"
                    where = f"{host_text}:{port_number}"
                    raise OSError(err.errno, f"cannot listen on {where}: {err.strerror}") from None
                sock.listen(BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_unix(path: str, mode: int = 0o660) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket file (nobody listening) is replaced,
    a live one or any other file is an error."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left behind by a process that died
        else:
            raise FileExistsError(f"{path}: another server is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(addr) or "unix socket"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def peer_name(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return "local"
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if stream.socket.family == socket.AF_INET6:
        host = str(addr[0])
        if host.startswith("::ffff:") and "." in host:  # an IPv4 client of a dual-stack socket
            return f"{host[7:]}:{addr[1]}"
        return f"[{host}]:{addr[1]}"
    if stream.socket.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The user id of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    _pid, uid, _gid = PEERCRED.unpack(raw)
    return int(uid)


def peer_allowed(sock: socket.socket | trio.socket.SocketType) -> bool:
    """Local control and hand-off sockets serve root and this process's own user only."""
    return peer_uid(sock) in (0, os.geteuid())


def to_trio_listener(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class PatientListener(trio.abc.Listener[trio.SocketStream]):
    """A listening socket for ``trio.serve_listeners`` whose accept outlasts every error: it is
    logged and accepting pauses (out of fds and the like), where serve_listeners would stop the
    server for any error but the four it retries."""

    def __init__(self, sock: socket.socket) -> None:
        self._listener = to_trio_listener(sock)

    async def accept(self) -> trio.SocketStream:
        while True:
            try:
                return await self._listener.accept()
            except OSError as err:
                log.warning("accept failed: %s", err, extra={"XNBD_ERRNO": str(err.errno)})
                await trio.sleep(ACCEPT_ERROR_PAUSE)

    async def aclose(self) -> None:
        await self._listener.aclose()


def to_trio_stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
