"""Hand a negotiated NBD connection from xnbd-wrapper to the xnbd-server serving that export.

The wrapper negotiates (fixed newstyle) itself, then passes the client's socket to the export's
long-running server process, which continues in the transmission phase with exactly what was
negotiated: structured replies, extended headers, metadata context ids, and any request bytes
the client already pipelined behind GO. One server process thus serves every client of its export.

Protocol, on a unix stream socket of mode 0600 owned by the server (one exchange per connection):

- wrapper -> server: one JSON object on one line (UTF-8, ``\\n``-terminated, at most 64 KiB),
  sent with ``sendmsg``; a hand-off carries exactly one descriptor (SCM_RIGHTS), the client::

      {"version": 1, "export": "disk1", "structured": true, "extended": true,
       "meta_contexts": {"1": "base:allocation"}, "pending": "<base64>"}

  ``extended`` (extended headers, which imply structured replies) is absent in messages of
  older wrappers, which means false.

  A line without a descriptor, ``{"version": 1, "query": "info"}``, only asks for the export.
- server -> wrapper: one JSON line, ``{"ok": true, "export": {...}, "pid": N}`` once the client is
  owned by the server (the wrapper may then close its copy), or ``{"ok": false, "error": "..."}``.
  ``export`` describes what the server advertises (size, flags, contexts), so the wrapper's
  handshakes match the process that will serve them.

Only root or the server's own user may connect (SO_PEERCRED), whatever the file mode says.
"""

from __future__ import annotations

import array
import base64
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from . import jsonline
from .listeners import peer_allowed
from .proto.consts import TxFlag
from .proto.messages import ExportInfo, Negotiated, transmission_flags

__all__ = [
    "HandoffError",
    "export_from_json",
    "export_to_json",
    "handoff_message",
    "negotiated_from",
    "query_export",
    "receive_handoffs",
    "send_handoff",
]

log = logging.getLogger("xnbdd")

VERSION = 1
MAX_LINE = jsonline.MAX_LINE
EXCHANGE_TIMEOUT = 5.0  # a local peer that stalls longer is broken; the next one gets its turn
FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class HandoffError(jsonline.LineError):
    """The hand-off did not happen; the client socket still belongs to the sender."""


# -- the messages -------------------------------------------------------------------------------


def export_to_json(info: ExportInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "size": info.size,
        "tx_flags": int(info.tx_flags),
        "description": info.description,
        "min_block": info.min_block,
        "preferred_block": info.preferred_block,
        "max_payload": info.max_payload,
        "meta_contexts": list(info.meta_contexts),
    }


def export_from_json(data: dict[str, Any]) -> ExportInfo:
    try:
        return ExportInfo(
            name=str(data["name"]),
            size=int(data["size"]),
            tx_flags=TxFlag(int(data["tx_flags"])),
            description=str(data.get("description", "")),
            min_block=int(data["min_block"]),
            preferred_block=int(data["preferred_block"]),
            max_payload=int(data["max_payload"]),
            meta_contexts=tuple(str(c) for c in data.get("meta_contexts", [])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise HandoffError(f"malformed export description: {err}") from None


def handoff_message(negotiated: Negotiated, pending: bytes = b"") -> dict[str, Any]:
    """What the wrapper sends along with the client socket."""
    return {
        "version": VERSION,
        "export": negotiated.export.name,
        "structured": negotiated.structured,
        "extended": negotiated.extended,
        "meta_contexts": {str(k): v for k, v in negotiated.meta_contexts.items()},
        "pending": base64.b64encode(pending).decode("ascii"),
    }


def negotiated_from(info: ExportInfo, message: dict[str, Any]) -> tuple[Negotiated, bytes]:
    """Rebuild the negotiated state on the server side, with the server's own flags (computed
    as the handshake does), plus the client's pipelined bytes."""
    extended = bool(message.get("extended", False))
    structured = extended or bool(message.get("structured", False))
    raw_contexts = message.get("meta_contexts") or {}
    contexts = {int(k): str(v) for k, v in raw_contexts.items()} if structured else {}
    flags = transmission_flags(
        info.tx_flags, structured=structured, extended=extended, contexts=bool(contexts)
    )
    pending = base64.b64decode(str(message.get("pending", "")), validate=True)
    negotiated = Negotiated(
        export=info,
        tx_flags=flags,
        structured=structured,
        meta_contexts=contexts,
        extended=extended,
    )
    return negotiated, pending


def _encode(message: dict[str, Any]) -> bytes:
    return jsonline.encode(message, HandoffError)


def _decode(line: bytes) -> dict[str, Any]:
    return jsonline.decode(line, HandoffError)


# -- the wrapper's side (blocking; run it in a thread from async code) ----------------------------


def _exchange(path: str, message: dict[str, Any], fd: int | None, timeout: float) -> dict[str, Any]:
    line = _encode(message)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
                if fd is not None
                else []
            )
            sent = conn.sendmsg([line], ancillary)
            if sent < len(line):
                conn.sendall(line[sent:])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    raise HandoffError(f"{path}: server closed the hand-off without an answer")
                reply += chunk
                if len(reply) > MAX_LINE:
                    raise HandoffError(f"{path}: answer too long")
        except OSError as err:
            raise HandoffError(f"{path}: {err.strerror or err}") from None
    answer = _decode(reply)
    if not answer.get("ok"):
        raise HandoffError(f"{path}: refused: {answer.get('error', 'no reason given')}")
    return answer


def send_handoff(
    path: str,
    client: socket.socket,
    negotiated: Negotiated,
    pending: bytes = b"",
    timeout: float = EXCHANGE_TIMEOUT,
) -> dict[str, Any]:
    """Pass ``client`` to the server listening at ``path``. On success the server owns the
    connection (close the local copy) and its answer is returned; on HandoffError it does not."""
    return _exchange(path, handoff_message(negotiated, pending), client.fileno(), timeout)


def query_export(path: str, timeout: float = EXCHANGE_TIMEOUT) -> dict[str, Any]:
    """Ask the server at ``path`` what it exports (answer as in the module comment)."""
    return _exchange(path, {"version": VERSION, "query": "info"}, None, timeout)


# -- the server's side --------------------------------------------------------------------------


async def _read_request(conn: trio.socket.SocketType) -> tuple[dict[str, Any], list[int]]:
    """The JSON line and every descriptor that came with it."""
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n"):
        chunk, ancdata, _flags, _addr = await conn.recvmsg(MAX_LINE, FD_SPACE)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % array.array("i").itemsize
                fds.extend(array.array("i", payload[:usable]))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            break
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data.endswith(b"\n"):
        for fd in fds:
            os.close(fd)
        raise HandoffError("incomplete hand-off message")
    try:
        return _decode(data), fds
    except HandoffError:
        for fd in fds:
            os.close(fd)
        raise


async def _answer(conn: trio.socket.SocketType, message: dict[str, Any]) -> None:
    line = _encode(message)
    while line:
        sent = await conn.send(line)
        line = line[sent:]


async def receive_handoffs(
    sock: socket.socket, describe: Callable[[], dict[str, Any]] | None = None
) -> AsyncIterator[tuple[socket.socket, dict[str, Any]]]:
    """Accept hand-offs on the listening unix socket ``sock`` forever; yield each client socket
    with the wrapper's message. ``describe`` supplies the ``export`` part of the answers. The
    socket file is removed when the iteration ends (the listener is this generator's)."""
    listener = trio.socket.from_stdlib_socket(sock)
    path = sock.getsockname()
    try:
        while True:
            conn, _ = await listener.accept()
            client: socket.socket | None = None
            message: dict[str, Any] = {}
            with conn:
                with trio.move_on_after(EXCHANGE_TIMEOUT):
                    client, message = await _exchange_with_wrapper(conn, describe)
            if client is not None:
                yield client, message
    finally:
        if isinstance(path, str) and path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        listener.close()


async def _exchange_with_wrapper(
    conn: trio.socket.SocketType, describe: Callable[[], dict[str, Any]] | None
) -> tuple[socket.socket | None, dict[str, Any]]:
    answer: dict[str, Any] = {"ok": True, "pid": os.getpid()}
    if describe is not None:
        answer["export"] = describe()
    try:
        if not peer_allowed(conn):
            await _answer(conn, {"ok": False, "error": "permission denied"})
            return None, {}
        message, fds = await _read_request(conn)
    except (OSError, HandoffError) as err:
        log.warning("hand-off failed: %s", err)
        return None, {}
    if message.get("version") != VERSION:
        for fd in fds:
            os.close(fd)
        await _answer(conn, {"ok": False, "error": f"unsupported version {message.get('version')}"})
        return None, {}
    if message.get("query") == "info" and not fds:
        await _answer(conn, answer)
        return None, {}
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        await _answer(conn, {"ok": False, "error": "a hand-off carries exactly one descriptor"})
        return None, {}
    client = socket.socket(fileno=fds[0])
    try:
        _check_handoff(message)
    except (ValueError, TypeError, AttributeError) as err:
        client.close()
        await _answer(conn, {"ok": False, "error": f"malformed hand-off: {err}"})
        return None, {}
    try:
        await _answer(conn, answer)
    except OSError:
        client.close()  # the wrapper gave up waiting and still owns the client
        return None, {}
    return client, message


def _check_handoff(message: dict[str, Any]) -> None:
    """Refuse (while the wrapper still listens) what ``negotiated_from`` could not rebuild."""
    if not isinstance(message.get("export"), str):
        raise ValueError("no export name")
    negotiated_from(ExportInfo(name="", size=0, tx_flags=TxFlag.HAS_FLAGS), message)
