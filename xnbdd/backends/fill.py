"""Bringing origin blocks into the proxy's cache: the lock table over busy blocks, the fetches
and the stores, for the clients' reads and writes and for cache-all. The rules they keep (a bit
set only after its data is stored, one fetch per missing block) are in backends/proxy.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial

import trio

from xnbdd.backends.base import CacheStore
from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, block_span
from xnbdd.backends.blocks import block_bytes
from xnbdd.backends.rangelock import RangeLock, RangeLocks
from xnbdd.remote import RemoteLink, StartedRead

log = logging.getLogger(__name__)

MAX_FETCH = 1 << 20  # bytes per origin request for client misses (bounded latency and memory)
# cache-all's stores into the cache running at once: the cache file's worker threads serve
# first come, first served, and a client's write must not queue behind a window of them
BACKGROUND_STORES = 4


class StoreSlots:
    """What each of cache-all's stores takes first (``CacheFill``): a capacity limiter
    entered without a scheduler pass while a slot is free (a pass per store costs cache-all a
    visible share of the link)."""

    def __init__(self, count: int = BACKGROUND_STORES) -> None:
        self._limiter = trio.CapacityLimiter(count)

    async def __aenter__(self) -> None:
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()

    async def __aexit__(self, *_exc: object) -> None:
        self._limiter.release()


class StartedFetch:
    """A cold read whose fetch ``CacheFill.start_read`` sent (a ``PendingRead``): the client's
    bytes are a slice of the fetched blocks, which are stored before ``result`` returns."""

    __slots__ = ("_end", "_sent", "_skip", "_store")

    def __init__(
        self, sent: StartedRead, store: Callable[[], Awaitable[bytearray]], skip: int, length: int
    ) -> None:
        self._sent = sent
        self._store = store
        self._skip = skip
        self._end = skip + length

    def when_data(self, answer: Callable[[memoryview], None]) -> None:
        skip, end = self._skip, self._end
        self._sent.when_whole(lambda data: answer(memoryview(data)[skip:end]))

    async def result(self) -> memoryview:
        return memoryview(await self._store())[self._skip : self._end]


class CacheFill:
    """One proxy cache's fetches, stores and lock table."""

    def __init__(self, cache: CacheStore, bitmap: Bitmap, size: int, cache_path: str) -> None:
        self._cache = cache
        self._bitmap = bitmap
        self._size = size
        self.cache_path = cache_path
        self.locks = RangeLocks()
        self.dirty = False  # bits set since the last flush
        self.fetched_blocks = 0
        self.zeroed_blocks = 0  # cached from the origin's allocation (zeros), never fetched
        self._store_error: OSError | None = None  # caching failing since (logged once)
        self._background_stores = StoreSlots()

    def mark_cached(self, first: int, stop: int) -> None:
        self._bitmap.set_range(first, stop)
        self.dirty = True

    def start_read(self, link: RemoteLink, offset: int, length: int) -> StartedFetch | None:
        """A read's fetch sent now, without waiting (``StartsReads``): only when every block is
        uncached and nobody holds any, else None (``ensure_cached`` sorts it out)."""
        first, stop = block_span(offset, length)
        if (stop - first) * BLOCK_SIZE > MAX_FETCH or self.locks.split(first, stop)[1]:
            return None
        if next(self._bitmap.runs(first, stop, False), None) != (first, stop):
            return None
        start, end = block_bytes(first, stop, self._size)
        sent = link.start_read(start, end - start)
        if sent is None:
            return None
        lock = self.locks.claim(first, stop)
        store = partial(self._fetch_claimed, link, first, stop, lock, store=False, sent=sent)
        return StartedFetch(sent, store, offset - start, length)

    def _store_slot(self, background: bool) -> AbstractAsyncContextManager[object]:
        """What a store into the cache waits for first: cache-all's (``background``) take one
        of a few slots, so the cache's threads always have room for the clients' I/O."""
        return self._background_stores if background else nullcontext()

    async def _zero_into_cache(
        self, first: int, stop: int, *, store: bool, background: bool = False
    ) -> None:
        """Blocks the caller holds busy that the origin reads as zeros: zero them in the cache
        (punch a hole where the file system can), then mark them cached; no fetch. Without
        ``store`` a failure leaves them uncached, silently (they are fetched when read)."""
        offset, end = block_bytes(first, stop, self._size)
        try:
            async with self._store_slot(background):
                await self._cache.zero(offset, end - offset, may_trim=True, fast=False, fua=False)
        except OSError:
            if store:
                raise
            return
        self.mark_cached(first, stop)
        self.zeroed_blocks += stop - first

    async def fetch_into_cache(
        self,
        link: RemoteLink,
        first: int,
        stop: int,
        *,
        store: bool = True,
        background: bool = False,
        sent: StartedRead | None = None,
    ) -> bytearray:
        """Fetch blocks the caller holds busy (``sent``: already asked for), store them, then
        (only then) mark them cached; returns what was fetched. Without ``store``, a failure
        to store is logged and the blocks stay uncached (a read is served all the same)."""
        offset, end = block_bytes(first, stop, self._size)
        data = await (link.read(offset, end - offset) if sent is None else link.finish_read(sent))
        try:
            async with self._store_slot(background):
                await self._cache.write(offset, data, fua=False)
        except OSError as exc:
            if self._store_error is None:
                log.error(
                    "cache %s: fetched blocks not cached (%s); reads are served from the "
                    "origin until caching works again",
                    self.cache_path,
                    exc.strerror or exc,
                )
            self._store_error = exc
            if store:
                raise
            return data
        if self._store_error is not None:
            self._store_error = None
            log.warning("cache %s: caching works again", self.cache_path)
        self.mark_cached(first, stop)
        self.fetched_blocks += stop - first
        return data

    async def ensure_cached(
        self,
        first: int,
        stop: int,
        link: RemoteLink,
        max_request: int,
        *,
        store: bool,
        zero: bool = False,
        background: bool = False,
    ) -> bytearray | None:
        """Make [first, stop) cached: fetch the missing blocks nobody else is fetching (adjacent
        ones together, at most ``max_request`` bytes per request) and wait for the others.
        Returns the data when all of [first, stop) came in one fetch of ours, else None.
        ``store`` False: blocks the cache could not take are left uncached (no error) and the
        call returns after one round, so a full cache never makes it fetch in a loop.
        ``zero``: the origin reads these blocks as zeros: zero them in the cache, no fetch.
        ``background``: cache-all's; its stores wait for a slot (``BACKGROUND_STORES``)."""
        fetch = partial(self._fetch_claimed, store=store, zero=zero, background=background)
        per_request = max(1, max_request // BLOCK_SIZE)
        fetched_once = False
        while True:
            mine: list[tuple[int, int]] = []
            others: dict[RangeLock, None] = {}  # ordered set
            for run_first, run_stop in self._bitmap.runs(first, stop, False):
                free, holders = self.locks.split(run_first, run_stop)
                for a, b in free:
                    mine.extend((c, min(c + per_request, b)) for c in range(a, b, per_request))
                others.update(dict.fromkeys(holders))
            if (not mine and not others) or (mine and fetched_once and not store):
                return None
            fetched_once = bool(mine)
            claims = [(a, b, self.locks.claim(a, b)) for a, b in mine]
            if len(claims) == 1:
                data = await fetch(link, *claims[0])
                if not others and mine[0] == (first, stop) and not zero:
                    return data
            elif claims:
                try:
                    async with trio.open_nursery() as nursery:
                        for claim in claims:
                            nursery.start_soon(fetch, link, *claim)
                except* OSError as group:
                    raise group.exceptions[0] from None
            for holder in others:
                await holder.done.wait()
                if holder.error is not None:
                    raise OSError(holder.error.errno, str(holder.error))

    async def _fetch_claimed(
        self,
        link: RemoteLink,
        first: int,
        stop: int,
        lock: RangeLock,
        *,
        store: bool,
        zero: bool = False,
        background: bool = False,
        sent: StartedRead | None = None,
    ) -> bytearray:
        error: OSError | None = None
        try:
            if zero:
                await self._zero_into_cache(first, stop, store=store, background=background)
                return bytearray()
            return await self.fetch_into_cache(
                link, first, stop, store=store, background=background, sent=sent
            )
        except OSError as exc:
            error = exc
            raise
        finally:
            self.locks.release(lock, error)
