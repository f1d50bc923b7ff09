"""A data-plane worker process: serves connections of a plain file, block device or cow overlay
export that the daemon hands to it, so a daemon's connections spread over cores (docs/data-path.md).

The daemon (workers.py) starts the process with one end of a unix SOCK_SEQPACKET pair as its only
argument. Every message is one JSON object; descriptors ride along as SCM_RIGHTS:

- daemon -> worker ``start`` (first, with the image's descriptor, or for ``kind`` ``cow`` the
  base's, the overlay's and its bitmap's): the export as the daemon advertises it, the paths,
  the limits and this process's share of ``--max-buf-size``, and where the daemon logs
  (``logs.destinations``): the worker logs there itself, the journal with the daemon's fields
  and its own ``XNBD_WORKER``, the log file (appending) or syslog; stderr until then.
- worker -> daemon ``ready``.
- daemon -> worker ``serve`` (with a duplicate of the client socket): ``id``, the negotiated
  state (``handoff.handoff_message``) and the client's peer name. The worker runs the same
  ``DataPlane`` as the daemon, in a thread per connection, over its own backend on the same
  image (positional I/O through any descriptor of one file is coherent).
- daemon -> worker ``stop`` / ``handover`` / ``abort`` with an ``id``: what ``DataPlane``'s
  ``request_stop`` / ``request_handover`` / ``abort`` do.
- worker -> daemon ``done`` with ``id`` and ``reason``: the plane ended; ``HANDED_OVER`` means
  the connection stopped at a request boundary with every reply out, and the daemon (which kept
  its own descriptor of the socket) goes on serving it.
- daemon -> worker ``limits`` (a SIGHUP reload): ``max_requests``, ``max_bytes`` (this
  process's share) and ``grace``, applied to every connection the worker serves.
- daemon -> worker ``reopen`` (a SIGHUP reload): reopen the log file.
- worker -> daemon ``usage``: requests in flight, bytes held and the limits in force, sent when
  they changed (at most every ``USAGE_INTERVAL``) and at once after ``limits``, so the daemon's
  query counts the whole server.

The worker ignores SIGINT and SIGTERM (the daemon stops it, connection by connection, after a
graceful stop or handover) and ends with the daemon: the kernel closes the daemon's end of the
socket pair however it exits. (Not PR_SET_PDEATHSIG: that follows the thread that started the
process, and trio starts processes from a thread of its cache, which exits when idle.)
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import trio

from . import logs
from .allocator import limit_arenas
from .backends.cow import CowBackend
from .backends.file import FileBackend
from .budget import ByteBudget, Limits
from .dataplane import DataPlane
from .dispatch import execute, guarded
from .export import Export
from .handoff import export_from_json, negotiated_from
from .proto.messages import ExportInfo, Negotiated, Request
from .tls import PlainTransport

log = logging.getLogger("xnbdd")

MAX_MESSAGE = 256 * 1024  # a serve message carries the bytes pipelined behind the handshake
FD_SPACE = socket.CMSG_SPACE(3 * array.array("i", [0]).itemsize)  # a cow start has three
PLANE_THREADS = trio.CapacityLimiter(1_000_000)  # one per connection, not a pool
USAGE_INTERVAL = 0.5  # seconds between usage reports while it changes


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    for fd in fds:
        os.set_inheritable(fd, False)
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def rights(*fds: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def attach_backend(start: dict[str, Any], fds: list[int]) -> FileBackend | CowBackend:
    """The daemon's backend, over the descriptors it sent (this process closes them)."""
    if start.get("kind") == "cow" and len(fds) == 3:
        path = str(start["path"])
        return CowBackend.attach(fds[0], path, fds[1], str(start["overlay"]), fds[2])
    if start.get("kind") == "file" and len(fds) == 1:
        return FileBackend(fds[0], str(start["path"]), readonly=bool(start["readonly"]))
    for fd in fds:
        os.close(fd)
    raise ValueError(f"unusable start message ({len(fds)} descriptors)")


class Worker:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = trio.socket.from_stdlib_socket(channel)
        self.planes: dict[int, DataPlane] = {}
        self._send_lock = trio.Lock()
        self._usage_changed = trio.Event()  # report now, not at the next interval

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            with contextlib.suppress(OSError):  # the daemon is gone: the read loop ends
                await self.channel.send(encode(message))

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        try:
            data, ancdata, _flags, _addr = await self.channel.recvmsg(MAX_MESSAGE, FD_SPACE)
        except OSError:
            return None
        if not data:
            return None
        return decode(data, ancdata)

    async def run(self) -> None:
        first = await self.receive()
        if first is None:
            return
        start, fds = first
        log_as(start["logging"])
        backend = attach_backend(start, fds)
        info = export_from_json(start["export"])
        export = Export(
            info.name,
            backend,
            description=info.description,
            readonly=bool(start["readonly"]),
        )
        limits = Limits()
        apply_limits(limits, start)
        budget = ByteBudget(limits)
        try:
            async with trio.open_nursery() as nursery:
                await self.send({"op": "ready", "pid": os.getpid()})
                reporting = trio.CancelScope()  # ends with the daemon, or the worker stays
                nursery.start_soon(self._report_usage, limits, budget, reporting)
                while True:
                    received = await self.receive()
                    if received is None:
                        break  # the daemon is gone: nothing can be handed back
                    message, fds = received
                    op, cid = message.get("op"), int(message.get("id", -1))
                    if op == "serve" and len(fds) == 1:
                        self._serve(nursery, cid, fds[0], message, export, info, limits, budget)
                        continue
                    if op == "limits":
                        apply_limits(limits, message)
                        self._usage_changed.set()
                        continue
                    if op == "reopen":
                        logs.reopen()
                        continue
                    for fd in fds:
                        os.close(fd)
                    plane = self.planes.get(cid)
                    if plane is None:
                        continue  # it ended meanwhile; its ``done`` is on the way
                    if op == "stop":
                        plane.request_stop()
                    elif op == "handover":
                        plane.request_handover()
                    elif op == "abort":
                        plane.abort()
                reporting.cancel()
                for plane in self.planes.values():
                    plane.abort()
        finally:
            with trio.CancelScope(shield=True):
                await backend.close()

    async def _report_usage(
        self, limits: Limits, budget: ByteBudget, scope: trio.CancelScope
    ) -> None:
        with scope:
            await self._report_usage_until_cancelled(limits, budget)

    async def _report_usage_until_cancelled(self, limits: Limits, budget: ByteBudget) -> None:
        last: dict[str, int] = {}
        while True:
            usage = {
                "requests": budget.requests,
                "bytes": budget.used,
                "max_requests": limits.max_requests,
                "max_bytes": limits.max_bytes,
            }
            if usage != last:
                await self.send({"op": "usage"} | usage)
                last = usage
            with trio.move_on_after(USAGE_INTERVAL):
                await self._usage_changed.wait()
            self._usage_changed = trio.Event()

    def _serve(
        self,
        nursery: trio.Nursery,
        cid: int,
        fd: int,
        message: dict[str, Any],
        export: Export,
        info: ExportInfo,
        limits: Limits,
        budget: ByteBudget,
    ) -> None:
        """Start serving a connection; the plane exists before the next message is read, so a
        ``handover`` right behind ``serve`` finds it."""
        try:
            negotiated, pending = negotiated_from(info, message["negotiated"])
        except (KeyError, TypeError, ValueError) as err:
            log.warning("worker: unusable connection state (%s)", err)
            os.close(fd)
            nursery.start_soon(self.send, {"op": "done", "id": cid, "reason": "unusable state"})
            return
        os.set_blocking(fd, False)
        fields = {"XNBD_CLIENT": str(message.get("peer", ""))}
        token = trio.lowlevel.current_trio_token()

        def submit(req: Request, cost: int) -> None:  # called by the plane's thread
            token.run_sync_soon(
                nursery.start_soon, self._handle, plane, req, cost, export, negotiated, fields
            )

        plane = DataPlane(
            PlainTransport(fd),
            export,
            negotiated,
            limits,
            budget,
            submit,
            pending=pending,
            fields=fields,
        )
        self.planes[cid] = plane
        nursery.start_soon(self._run_plane, cid, fd, plane)

    async def _run_plane(self, cid: int, fd: int, plane: DataPlane) -> None:
        reason = "worker failed"
        try:
            reason = await trio.to_thread.run_sync(plane.run, limiter=PLANE_THREADS)
        finally:
            del self.planes[cid]
            os.close(fd)  # the daemon holds its own descriptor of the socket
            await self.send({"op": "done", "id": cid, "reason": reason})

    async def _handle(
        self,
        plane: DataPlane,
        req: Request,
        cost: int,
        export: Export,
        negotiated: Negotiated,
        fields: dict[str, str],
    ) -> None:
        await export.admit()
        try:
            reply = await guarded(req, negotiated, fields, execute(req, export, negotiated, fields))
        finally:
            export.release()
        plane.complete(reply, cost)


def apply_limits(limits: Limits, message: dict[str, Any]) -> None:
    """A reload's limits; the planes and the budget read them at each request."""
    limits.max_requests = int(message["max_requests"])
    limits.max_bytes = int(message["max_bytes"])
    limits.shutdown_grace = float(message["grace"])


def log_as(daemon: dict[str, Any]) -> None:
    """Log where the daemon logs (``logs.destinations``), with its context fields and this
    process's own, so the journal (or the file, or syslog) has every record as the daemon's."""
    try:
        logs.setup_logging(**daemon["setup"])
    except OSError as err:  # the daemon opened them a moment ago: say so, keep stderr
        log.error("logging as the daemon does failed, logging to stderr: %s", err)
        return
    logs.set_context(**daemon["context"], XNBD_WORKER=str(os.getpid()))


def main(argv: list[str]) -> int:
    limit_arenas()  # before any thread, as in the daemon: one arena per connection thread is not
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup_logging(identifier="xnbd-server-worker")  # until the start message says more
    channel = socket.socket(fileno=int(argv[0]))
    trio.run(Worker(channel).run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
