"""The control socket server, for root and the daemon's own user only (docs/decisions.md D23).

The socket is created mode 0600 and listens only after the chmod; every connection's peer
credentials (SO_PEERCRED) are checked as well, so a looser directory does not open it up. A stale
socket file is removed only after checking that nobody listens on it. A bad request gets an error
line; neither the connection nor the daemon goes down for it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from contextlib import suppress
from functools import partial

import trio

from ..listeners import STREAM_GONE, peer_uid
from .handlers import ControlTarget, handle
from .protocol import ControlError, LineBuffer, error, ok, parse_request

log = logging.getLogger(__name__)

OPERATOR_ERRORS = (ControlError, OSError, ValueError, RuntimeError)


def bind_control_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600. A leftover socket file nobody listens on
    is replaced; a live one, or any other kind of file, is an error (FileExistsError)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", path)
            with suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise FileExistsError(
                errno.EEXIST, f"{path}: cannot tell if it is in use: {exc}"
            ) from exc
        else:
            raise FileExistsError(errno.EEXIST, f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody can connect in between
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _serve_connection(stream: trio.SocketStream, target: ControlTarget) -> None:
    uid = peer_uid(stream.socket)
    if uid not in (0, os.geteuid()):
        log.warning("control connection from uid %d refused", uid)
        with suppress(*STREAM_GONE):
            await stream.send_all(error("permission denied"))
        await stream.aclose()
        return
    lines = LineBuffer()
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except STREAM_GONE:
                return
            if not data:
                return
            try:
                received = lines.feed(data)
            except ControlError as exc:
                await _send(stream, error(str(exc)))
                continue
            for line in received:
                if not await _send(stream, await _answer(line, target, stream)):
                    return


async def _answer(line: bytes, target: ControlTarget, stream: trio.SocketStream) -> bytes:
    async def emit(message: bytes) -> None:
        await stream.send_all(message)

    try:
        request = parse_request(line)
        return ok(await handle(target, request, emit))
    except (Exception, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if not isinstance(leaf, Exception):  # Cancelled, KeyboardInterrupt: not ours to eat
            raise
        if isinstance(leaf, STREAM_GONE):
            return b""  # the client went away (e.g. during cache-all): nothing to answer
        if isinstance(leaf, OPERATOR_ERRORS):
            return error(str(leaf) or type(leaf).__name__)
        log.exception("control request %r failed", line[:200])
        return error(f"internal error: {leaf!r}")


async def _send(stream: trio.SocketStream, message: bytes) -> bool:
    if not message:
        return False
    try:
        await stream.send_all(message)
    except STREAM_GONE:
        return False
    return True


async def serve_control(
    path: str,
    target: ControlTarget,
    *,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled, then remove the file (if it is
    still ours). ``sock``: an already listening socket (e.g. from systemd), used as is."""
    own = sock is None
    listening = bind_control_socket(path) if sock is None else sock
    inode = os.stat(path).st_ino if own else None
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listening))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(
                partial(_serve_connection, target=target), [listener], handler_nursery=nursery
            )
    finally:
        if own:
            with suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
