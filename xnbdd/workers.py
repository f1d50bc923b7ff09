"""The daemon's side of its data-plane worker processes (worker.py): connections spread over cores.

One daemon process shares one interpreter lock between all its data-plane threads, so four
connections get no more done than one. With workers, a connection of a plain file, block
device or cow overlay export is handed, once negotiated, to the least loaded worker: the worker
gets a duplicate of the socket and serves it with the same ``DataPlane``. The daemon keeps its own
descriptor and its ``Connection`` (the control socket's query lists it, a stop reaches it), and
drives the remote plane through ``RemotePlane``, which answers to the same stop, handover and
abort as a local one.

- Workers start at the first moment two connections are in transmission at once (one connection
  gains nothing from another process, and the test suite starts daemons by the hundred); the
  connections served here meanwhile move out at a request boundary once every worker is ready.
- ``recalled``: snapshots need every write to pass the daemon's pause gate and write guard, so
  before one the daemon asks every worker to hand its connections back at a request boundary,
  serves them here while the snapshot runs, and hands them out again afterwards. A connection
  that cannot reach a boundary within the shutdown grace (its client reads no replies) is cut:
  no write may bypass the guard.
- A worker that dies takes only its own connections (their clients see the socket close, since
  the daemon closes its descriptor too); the daemon logs it and starts another.
- Each process has its own share of ``--max-buf-size`` (the daemon's and every worker's add up
  to it); ``--max-queue-size`` is per connection, wherever it is served.
- TLS sessions live in the daemon's memory and cannot move: TLS connections are served here.
- A SIGHUP reload's limits reach every worker (``apply_limits``); each worker reports what it
  holds (``usage``), so the query counts the whole server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from . import logs
from .backends.base import Backend
from .backends.cow import CowBackend
from .backends.file import FileBackend
from .budget import Limits
from .export import Export
from .handoff import export_to_json, handoff_message
from .proto.messages import Negotiated
from .worker import FD_SPACE, MAX_MESSAGE, decode, encode, rights

log = logging.getLogger("xnbdd")

DEFAULT_MAX_WORKERS = 8
RESPAWN_DELAY = 1.0  # a worker that dies at once is not restarted in a tight loop
EXIT_WAIT = 5.0  # a worker told to end (its socket closed) gets this long before SIGKILL


def default_workers() -> int:
    """One per CPU this process may run on, at most ``DEFAULT_MAX_WORKERS``; none on one CPU
    (pinned benchmarks, small hosts: nothing to spread over)."""
    cpus = len(os.sched_getaffinity(0))
    return 0 if cpus <= 1 else min(cpus, DEFAULT_MAX_WORKERS)


def _child_environment() -> dict[str, str]:
    """This environment, with the directory this package was imported from first on the
    worker's path (the daemon may run from a tree that is not installed)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # only the daemon speaks to the service manager
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def serves(backend: Backend) -> bool:
    """Whether workers can serve this backend: one whose state is all in files they can share
    (a plain file or device; a cow overlay, whose bitmap every process maps). The proxy's lock
    table and origin link, and rbd's client, live in the daemon."""
    return isinstance(backend, (FileBackend, CowBackend))


def start_message(export: Export, limits: Limits) -> tuple[dict[str, Any], list[int]]:
    """What a worker starts with (worker.py): the export as advertised, and the image's
    descriptors (shared, so a renamed or replaced path cannot split the truth)."""
    backend = export.backend
    message: dict[str, Any]
    fds: list[int]
    if isinstance(backend, CowBackend):
        message = {"kind": "cow", "path": backend.base.path, "overlay": backend.overlay_path}
        fds = list(backend.descriptors())
    else:
        assert isinstance(backend, FileBackend), "workers serve files, devices and cow overlays"
        message, fds = {"kind": "file", "path": backend.path}, [backend.fd]
    message |= {
        "op": "start",
        "export": export_to_json(export.info()),
        "readonly": export.force_readonly,
        "max_requests": limits.max_requests,
        "max_bytes": limits.max_bytes,
        "grace": limits.shutdown_grace,
        "logging": logs.destinations(),
    }
    return message, fds


class Plane(Protocol):
    """What the daemon asks of a connection's data plane, local (``DataPlane``) or remote."""

    def request_stop(self) -> None: ...

    def request_handover(self) -> None: ...

    def abort(self) -> None: ...


class RemotePlane:
    """A connection served by a worker, as the daemon sees it."""

    def __init__(self, worker: WorkerProcess, cid: int) -> None:
        self.worker = worker
        self.cid = cid
        self.reason = ""
        self.recalled = False
        self._done = trio.Event()

    def request_stop(self) -> None:
        self.worker.post({"op": "stop", "id": self.cid})

    def request_handover(self) -> None:
        self.worker.post({"op": "handover", "id": self.cid})

    def abort(self) -> None:
        self.worker.post({"op": "abort", "id": self.cid})

    def finish(self, reason: str) -> None:
        if not self._done.is_set():
            self.reason = reason
            self._done.set()

    async def run(self) -> str:
        """Wait for the plane's end; ``dataplane.HANDED_OVER``: the daemon serves it on."""
        await self._done.wait()
        return self.reason


class WorkerProcess:
    def __init__(self, pool: Workers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid = 0
        self.ready = False
        self.planes: dict[int, RemotePlane] = {}
        self.lost = 0  # connections it was serving when it ended
        self.usage: dict[str, int] = {}  # its last report: requests, bytes and its limits
        self._process: trio.Process | None = None
        self._out, self._outgoing = trio.open_memory_channel[tuple[dict[str, Any], int | None]](
            math.inf
        )

    def post(self, message: dict[str, Any], fd: int | None = None) -> None:
        """Queue a message (in order); ``fd`` must stay open until it is sent."""
        # once the worker is gone its planes are finished already
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._out.send_nowait((message, fd))

    async def run(self, start: dict[str, Any], image_fds: list[int]) -> str:
        """Run the process until it ends; returns how it ended."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE * 2)
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "xnbdd.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=_child_environment(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = process.pid
        self._process = process
        channel = trio.socket.from_stdlib_socket(ours)
        try:
            await channel.sendmsg([encode(start)], rights(*image_fds))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, channel)
                await self._reader(channel)
                nursery.cancel_scope.cancel()
        except OSError:
            pass  # the process is gone before its start message: as EOF
        finally:
            self.ready = False
            self._out.close()
            channel.close()  # the worker sees the end and exits (it ignores SIGTERM)
            self.lost = len(self.planes)
            for plane in self.planes.values():
                plane.finish("its worker process ended")
            self.planes.clear()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(EXIT_WAIT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        code = process.returncode
        assert code is not None
        return f"exit status {code}" if code >= 0 else f"signal {-code}"

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    # Both end quietly when the process is gone: a reset (it died with messages unread) is an
    # end like EOF, and must not escape the nursery as an exception group.

    async def _sender(self, channel: trio.socket.SocketType) -> None:
        async for message, fd in self._outgoing:
            try:
                await channel.sendmsg([encode(message)], rights(fd) if fd is not None else [])
            except OSError:
                return  # the reader sees the end too

    async def _reader(self, channel: trio.socket.SocketType) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = await channel.recvmsg(MAX_MESSAGE, FD_SPACE)
            except OSError:
                return
            if not data:
                return
            message, fds = decode(data, ancdata)
            for fd in fds:
                os.close(fd)  # none are expected
            op = message.get("op")
            if op == "ready":
                self.ready = True
                self.pool.worker_ready()
            elif op == "usage":
                self.usage = {k: int(v) for k, v in message.items() if k != "op"}
                self.pool.usage_reported()
            elif op == "done":
                plane = self.planes.pop(int(message.get("id", -1)), None)
                if plane is not None:
                    plane.finish(str(message.get("reason", "")))
                    self.pool.settled()


class Workers:
    """The daemon's worker processes; ``count`` 0 serves everything in the daemon."""

    def __init__(
        self,
        count: int,
        start: Callable[[], tuple[dict[str, Any], list[int]]],
        stopping: trio.Event,
        recall_timeout: Callable[[], float],
    ) -> None:
        self.count = count
        self._start = start  # the start message and the image descriptors to send with it
        self._stopping = stopping
        self._recall_timeout = recall_timeout
        self.processes: list[WorkerProcess] = []
        self.local: dict[object, Plane] = {}  # connections that could be served by a worker
        self._held = 0  # recalls running: nothing is handed out
        self._wanted = trio.Event()
        self._settled = trio.Event()
        self._reported = trio.Event()
        self._next_id = 0

    # -- connections ----------------------------------------------------------------------------

    def assign(
        self, fd: int, negotiated: Negotiated, pending: bytes, peer: str
    ) -> RemotePlane | None:
        """Hand a negotiated connection to the least loaded worker; None: serve it here."""
        if not self.count or self._held or self._stopping.is_set():
            return None
        ready = [w for w in self.processes if w.ready]
        if not ready:
            if self.local:  # a second connection: now workers are worth their start
                self._wanted.set()
            return None
        message = {
            "op": "serve",
            "id": self._next_id,
            "negotiated": handoff_message(negotiated, pending),
            "peer": peer,
        }
        if len(encode(message)) > MAX_MESSAGE:
            return None  # an unusually large pipelined tail: served here
        worker = min(ready, key=lambda w: len(w.planes))
        plane = RemotePlane(worker, self._next_id)
        self._next_id += 1
        worker.planes[plane.cid] = plane
        worker.post(message, fd)
        return plane

    def where(self, plane: object) -> int | None:
        """The worker's PID serving ``plane``, None for the daemon."""
        return plane.worker.pid if isinstance(plane, RemotePlane) else None

    def worker_ready(self) -> None:
        if all(w.ready for w in self.processes) and len(self.processes) == self.count:
            log.info("%d data-plane worker processes ready", self.count)
            self._spread()

    def settled(self) -> None:
        self._settled.set()
        self._settled = trio.Event()

    def _spread(self) -> None:
        """Move the connections served here to the workers, each at a request boundary."""
        if self._held or self._stopping.is_set():
            return
        for plane in self.local.values():
            plane.request_handover()

    @asynccontextmanager
    async def recalled(self) -> AsyncIterator[None]:
        """Inside: no connection is served by a worker (each came back at a request boundary,
        or was cut if it could not reach one in time)."""
        self._held += 1
        try:
            asked: set[int] = set()
            with trio.move_on_after(self._recall_timeout()) as waited:
                while out := self.remote():
                    for plane in out:
                        if id(plane) not in asked:
                            asked.add(id(plane))
                            plane.request_handover()
                    await self._settled.wait()
            if waited.cancelled_caught:
                out = self.remote()
                log.warning(
                    "%d connection(s) did not reach a request boundary in time: cut", len(out)
                )
                for plane in out:
                    plane.abort()
                with trio.move_on_after(self._recall_timeout()):
                    while self.remote():
                        await self._settled.wait()
                for worker in self.processes:
                    if worker.planes:  # wedged: its connections end with it
                        log.warning("worker pid %d does not answer: killed", worker.pid)
                        worker.kill()
                while self.remote():
                    await self._settled.wait()
            yield
        finally:
            self._held -= 1
            self._spread()

    # -- limits and usage -----------------------------------------------------------------------

    def reopen_logs(self) -> None:
        """A reload: every worker reopens its log file (after logrotate moved it)."""
        for worker in self.processes:
            worker.post({"op": "reopen"})

    def apply_limits(self, limits: Limits) -> None:
        """A reload: every worker serves with ``limits`` (each holds the same share of
        ``--max-buf-size`` as the daemon); a worker started later starts with them anyway."""
        for worker in self.processes:
            worker.post(
                {
                    "op": "limits",
                    "max_requests": limits.max_requests,
                    "max_bytes": limits.max_bytes,
                    "grace": limits.shutdown_grace,
                }
            )

    def usage(self) -> tuple[int, int]:
        """Requests in flight and bytes held by the workers, as they last reported."""
        ready = [w.usage for w in self.processes if w.ready]
        return sum(u.get("requests", 0) for u in ready), sum(u.get("bytes", 0) for u in ready)

    def usage_reported(self) -> None:
        self._reported.set()
        self._reported = trio.Event()

    async def next_report(self) -> None:
        """Until a worker reports its usage again."""
        await self._reported.wait()

    def pids(self) -> list[int]:
        """The worker processes ready to serve."""
        return [w.pid for w in self.processes if w.ready]

    def remote(self) -> list[RemotePlane]:
        """The connections served by workers now."""
        return [plane for w in self.processes for plane in w.planes.values()]

    # -- the processes --------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the workers once they are wanted, and replace any that dies, until cancelled."""
        if not self.count:
            return
        await self._wanted.wait()
        async with trio.open_nursery() as nursery:
            for index in range(self.count):
                nursery.start_soon(self._keep, index)

    async def _keep(self, index: int) -> None:
        while True:
            worker = WorkerProcess(self, index)
            self.processes.append(worker)
            try:
                start, image_fds = self._start()
                how = await worker.run(start, image_fds)
            except OSError as err:
                how = f"could not start: {err}"
            finally:
                self.processes.remove(worker)
                self.settled()
            log.warning(
                "data-plane worker %d (pid %d) ended (%s)%s; starting another",
                index,
                worker.pid,
                how,
                f", {worker.lost} connection(s) closed" if worker.lost else "",
            )
            await trio.sleep(RESPAWN_DELAY)
