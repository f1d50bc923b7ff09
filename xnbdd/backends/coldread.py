"""The proxy's cold read, sent to the origin by a connection's own thread.

docs/data-path.md "The proxy's cold read": when none of a READ's blocks is cached or busy, the
data-plane thread claims them in the proxy's range-lock table (under its mutex, in one step with
the look at the bitmap) and writes the request on the origin socket itself
(``RemoteLink.start_read``). The reply comes to ``_fetched`` on the event loop's thread, with no
task: the client is answered from the fetched buffer, then the blocks are stored, marked cached
(``ProxyBackend.mark_fetched``: only after the data is in the cache file) and released. What a
thread cannot finish (a store that must wait for a device, a lost origin connection) runs as a
task of the proxy's nursery.
"""

from __future__ import annotations

import errno
from collections.abc import Coroutine
from functools import partial
from typing import Protocol

import trio

from xnbdd.backends.base import CacheStore, ReadDone
from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, block_span
from xnbdd.backends.blocks import block_bytes
from xnbdd.backends.rangelock import RangeLock, RangeLocks
from xnbdd.origin_connection import OriginConnectionLost
from xnbdd.remote import RemoteLink


class Owner(Protocol):
    """What the cold reader needs of the proxy."""

    @property
    def detached(self) -> bool: ...

    def mark_fetched(self, first: int, stop: int) -> None: ...

    def store_failed(self, exc: OSError, *, store: bool) -> None: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...


class ColdReader:
    """Cold reads of one proxy started by connection threads."""

    def __init__(
        self, owner: Owner, link: RemoteLink, cache: CacheStore, bitmap: Bitmap, locks: RangeLocks
    ) -> None:
        self._owner = owner
        self._link = link
        self._cache = cache
        self._bitmap = bitmap
        self._locks = locks
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def serve(self, nursery: trio.Nursery) -> None:
        """Start taking reads; leftover work runs in ``nursery``."""
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()

    def start(self, offset: int, length: int, done: ReadDone) -> bool:
        """From a connection's thread: claim the blocks and send the READ; False: nothing
        started (partly cached, busy, not serving, or no live plain-socket origin link)."""
        token = self._token
        if token is None:
            return False
        first, stop = block_span(offset, length)
        with self._locks.mutex:  # the look and the claim are one step for every thread
            if (
                self._owner.detached
                or next(self._bitmap.runs(first, stop, True), None) is not None
                or self._locks.holder(first, stop) is not None
            ):
                return False  # partly cached, or busy: the event loop's path sorts it out
            lock = self._locks.claim(first, stop)
        start, end = block_bytes(first, stop, self._link.size)
        fetched = partial(self._fetched, offset, length, lock, done)
        if self._link.start_read(start, end - start, fetched):
            return True
        token.run_sync_soon(self._locks.release, lock)  # waiters are trio tasks
        return False

    def _fetched(
        self,
        offset: int,
        length: int,
        lock: RangeLock,
        done: ReadDone,
        data: bytearray | None,
        error: OSError | None,
    ) -> None:
        """The origin answered a thread's cold read (event loop's thread): answer the client
        first (its thread wakes while this one stores), then store, mark, release."""
        if data is None:
            assert error is not None
            if isinstance(error, OriginConnectionLost):
                self._locks.release(lock)
                self._read_later(offset, length, done)  # reconnects and retries
                return
            self._locks.release(lock, error)
            done(None, error)
            return
        start = offset - lock.first * BLOCK_SIZE
        done(memoryview(data)[start : start + length], None)
        # The blocks stay held until stored: no fetch or write touches them meanwhile, and a
        # switch to target waits for them (``ProxyBackend._settled``).
        if self._owner.detached:  # stopped or switched meanwhile: nothing to store into
            self._locks.release(lock)
            return
        try:
            stored = self._cache.try_write(lock.first * BLOCK_SIZE, data)
        except OSError as exc:
            self._owner.store_failed(exc, store=False)
            self._locks.release(lock)
            return
        if not stored:  # the cache must wait for its device
            self._spawn(self._store(lock, data), None)
            return
        self._owner.mark_fetched(lock.first, lock.stop)
        self._locks.release(lock)

    async def _store(self, lock: RangeLock, data: bytearray) -> None:
        try:
            await self._cache.write(lock.first * BLOCK_SIZE, data, fua=False)
        except OSError as exc:
            self._owner.store_failed(exc, store=False)
        else:
            if not self._owner.detached:
                self._owner.mark_fetched(lock.first, lock.stop)
        finally:
            self._locks.release(lock)

    def _read_later(self, offset: int, length: int, done: ReadDone) -> None:
        """The event loop's path for a cold read a thread could not finish."""

        async def read() -> None:
            try:
                data = await self._owner.read(offset, length)
            except OSError as exc:
                done(None, exc)
            else:
                done(data, None)

        self._spawn(read(), done)

    def _spawn(self, job: Coroutine[object, object, None], done: ReadDone | None) -> None:
        """Run ``job`` in the background; a client waiting for it (``done``) still gets its
        answer (EIO) if the proxy is stopping and it cannot run or is cancelled."""

        async def guarded() -> None:
            try:
                await job
            except trio.Cancelled:
                if done is not None:
                    done(None, OSError(errno.EIO, "proxy stopping"))
                raise

        nursery = self._nursery
        try:
            if nursery is None:
                raise RuntimeError("not serving")
            nursery.start_soon(guarded)
        except RuntimeError:
            job.close()
            if done is not None:
                done(None, OSError(errno.EIO, "proxy stopping"))
