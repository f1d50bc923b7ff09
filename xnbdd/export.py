"""One export: a backend shared by every connection, and the gate that lets the daemon pause it.

Snapshots and the proxy->target switch need a moment when no request is running. Requests pass
``admit``/``release``; ``paused()`` stops new admissions, waits for the running ones, and lets the
caller work (or swap the backend) before everything resumes. Clients see a short delay, no error.
Connections' data-plane threads pass the gate too (``try_admit``), so it is guarded by a lock and
a release on another thread wakes the paused event loop through its trio token.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .backends.base import Backend, Extent, InlineIO, PipeSink, StartsReads
from .proto.consts import BASE_ALLOCATION, MAX_PAYLOAD, MIN_BLOCK, PREFERRED_BLOCK, State, TxFlag
from .proto.messages import ExportInfo

# A metadata context beyond base:allocation: (offset, length) -> [(length, flags)]
ContextProvider = Callable[[int, int], Awaitable[list[tuple[int, int]]]]


def base_allocation(extents: list[Extent]) -> list[tuple[int, int]]:
    return [
        (e.length, (State.HOLE if e.hole else 0) | (State.ZERO if e.zero else 0)) for e in extents
    ]


class Export:
    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        description: str = "",
        readonly: bool = False,
        rotational: bool = False,
        one_connection: bool = False,
    ) -> None:
        self.name = name
        self.rotational = rotational  # NBD_FLAG_ROTATIONAL: a seek-bound device (rotational.py)
        # This process serves one connection (--inetd, --connected-fd, Accept=yes): a client's
        # other connections reach other processes, which share only what the backend shares.
        self.one_connection = one_connection
        self.description = description
        self._use(backend)
        self.force_readonly = readonly
        self.extra_contexts: dict[str, ContextProvider] = {}
        self._gate = threading.Lock()
        self._in_flight = 0
        # written under ``_gate``; a data-plane thread that holds the gate across batches reads
        # it without the lock to know when to let go (dataplane.py)
        self.pausing = False
        self._resume = trio.Event()
        self._resume.set()
        self._drained = trio.Event()
        self._pause_lock = trio.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0

    @property
    def size(self) -> int:
        return self.backend.size

    def tx_flags(self) -> TxFlag:
        """Advertise exactly what the backend can do; SEND_DF depends on the connection
        (proto.messages.transmission_flags)."""
        caps = self.backend.capabilities
        flags = TxFlag.HAS_FLAGS
        readonly = caps.readonly or self.force_readonly
        if readonly:
            flags |= TxFlag.READ_ONLY
        if caps.flush:
            flags |= TxFlag.SEND_FLUSH
        if caps.fua and not readonly:
            flags |= TxFlag.SEND_FUA
        if caps.trim and not readonly:
            flags |= TxFlag.SEND_TRIM
        if caps.zero and not readonly:
            flags |= TxFlag.SEND_WRITE_ZEROES
            if caps.fast_zero:
                flags |= TxFlag.SEND_FAST_ZERO
        if caps.multi_conn and (caps.shared_by_processes or not self.one_connection):
            flags |= TxFlag.CAN_MULTI_CONN
        if self.rotational:
            flags |= TxFlag.ROTATIONAL
        if caps.cache:
            flags |= TxFlag.SEND_CACHE
        return flags

    def meta_contexts(self) -> tuple[str, ...]:
        names = [BASE_ALLOCATION] if self.backend.capabilities.block_status else []
        return (*names, *self.extra_contexts)

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.size,
            tx_flags=self.tx_flags(),
            description=self.description,
            min_block=MIN_BLOCK,
            preferred_block=PREFERRED_BLOCK,
            max_payload=MAX_PAYLOAD,
            meta_contexts=self.meta_contexts(),
        )

    async def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context == BASE_ALLOCATION:
            return base_allocation(await self.backend.block_status(offset, length))
        return await self.extra_contexts[context](offset, length)

    # -- the gate -------------------------------------------------------------------------------

    async def admit(self) -> None:
        """Wait while the export is paused, then count one running request."""
        while not self.try_admit():
            await self._resume.wait()

    def try_admit(self) -> bool:
        """``admit`` without waiting, from any thread: False while paused."""
        with self._gate:
            if self.pausing:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """From any thread: the request is done with the backend."""
        with self._gate:
            self._in_flight -= 1
            drained = self.pausing and self._in_flight == 0
        if not drained:
            return
        if threading.get_ident() == self._loop_thread:
            self._drained.set()
        elif self._token is not None:
            self._token.run_sync_soon(self._drained.set)

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No request runs inside this block; new ones wait at ``admit``."""
        async with self._pause_lock:
            self._token = trio.lowlevel.current_trio_token()
            self._loop_thread = threading.get_ident()
            self._resume = trio.Event()
            self._drained = trio.Event()
            with self._gate:
                self.pausing = True
                busy = self._in_flight > 0
            try:
                if busy:
                    await self._drained.wait()
                yield
            finally:
                with self._gate:
                    self.pausing = False
                self._resume.set()

    async def replace_backend(self, make: Callable[[], Awaitable[Backend]]) -> None:
        """Swap the backend under live connections (proxy -> target): ``make`` builds the new
        one while no request runs, so no request sees a half-switched export."""
        async with self.paused():
            self._use(await make())

    def _use(self, backend: Backend) -> None:
        """Serve ``backend``, its optional sides resolved once rather than per request."""
        self.backend = backend
        self.inline = _inline_io(backend)
        self.pipe_sink = _pipe_sink(backend)
        self.starts_reads = _starts_reads(backend)


def _inline_io(backend: Backend) -> InlineIO | None:
    """The backend's synchronous side, resolved once per backend rather than per request."""
    return backend if isinstance(backend, InlineIO) else None


def _pipe_sink(backend: Backend) -> PipeSink | None:
    return backend if isinstance(backend, PipeSink) and backend.takes_pipes else None


def _starts_reads(backend: Backend) -> StartsReads | None:
    return backend if isinstance(backend, StartsReads) else None
