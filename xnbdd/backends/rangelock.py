"""Exclusive locks over block ranges, shared by the cow overlay and the proxy cache.

A holder owns blocks [first, stop) until it releases them; a task that wants any of those
blocks waits for the holder to leave and looks again. The held ranges are few (one per request
in flight), so a list scanned on each request costs less than a table entry per block.

A holder that fetched data for others may fail: ``release(lock, error)`` records the OSError so
that tasks waiting for those blocks learn it instead of fetching them again at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLock:
    """Blocks [first, stop) held by one task; ``done`` is set when it releases them."""

    __slots__ = ("done", "error", "first", "stop")

    def __init__(self, first: int, stop: int) -> None:
        self.first = first
        self.stop = stop
        self.done = trio.Event()
        self.error: OSError | None = None  # a fetch that failed (not one that was cancelled)


class RangeLocks:
    """The held block ranges of one bitmap's blocks."""

    def __init__(self) -> None:
        self._held: list[RangeLock] = []

    def _holder(self, first: int, stop: int) -> RangeLock | None:
        return next((h for h in self._held if h.first < stop and first < h.stop), None)

    def claim(self, first: int, stop: int) -> RangeLock:
        """Hold [first, stop) at once; the caller has seen that nobody holds any of it."""
        lock = RangeLock(first, stop)
        self._held.append(lock)
        return lock

    async def acquire(self, first: int, stop: int) -> RangeLock:
        """Wait until no block of [first, stop) is held, then hold them all."""
        while (busy := self._holder(first, stop)) is not None:
            await busy.done.wait()
        return self.claim(first, stop)

    def release(self, lock: RangeLock, error: OSError | None = None) -> None:
        """Give the blocks back and wake their waiters (``error``: why a fetch failed)."""
        self._held.remove(lock)
        lock.error = error
        lock.done.set()

    @asynccontextmanager
    async def hold(self, first: int, stop: int) -> AsyncIterator[RangeLock]:
        lock = await self.acquire(first, stop)
        try:
            yield lock
        finally:
            self.release(lock)

    def split(self, first: int, stop: int) -> tuple[list[tuple[int, int]], list[RangeLock]]:
        """[first, stop) as the runs nobody holds, in order, and the holders of the rest."""
        if not self._held:
            return [(first, stop)], []
        holders = sorted(
            (h for h in self._held if h.first < stop and first < h.stop), key=lambda h: h.first
        )
        free: list[tuple[int, int]] = []
        pos = first
        for holder in holders:
            if holder.first > pos:
                free.append((pos, holder.first))
            pos = max(pos, holder.stop)
        if pos < stop:
            free.append((pos, stop))
        return free, holders
