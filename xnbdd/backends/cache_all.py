"""cache-all: copy every block the proxy's cache lacks, filling the origin link throughout.

One run walks the bitmap from the start and keeps a bounded number of fetches in flight
(``BULK_BYTES_IN_FLIGHT``) over a connection of its own, so client misses never queue behind the
bulk copy. That connection is opened while the first windows already go over the clients' one:
the link is busy from the first millisecond, not after a TCP and an NBD handshake. An origin that
allows one connection only is shared, with few requests queued (``BULK_SHARED_REQUESTS``).

When the origin answers ``base:allocation`` (docs/data-path.md "The sparse-aware proxy"), each
stretch of up to ``STATUS_SPAN`` bytes is planned from its block status first: whole blocks the
origin reads as zeros are zeroed in the cache without a fetch. The first stretch's answer is
asked for when the proxy connects (``AllocationHint``), so cache-all's first window leaves at once
instead of after a round trip. The proxy's ``CacheFill`` (``backends/fill.py``) does the
fetching, storing and locking; this module decides what to ask for and when.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

import trio

from xnbdd.backends.bitmap import BLOCK_SIZE, nblocks_for
from xnbdd.backends.blocks import zero_blocks
from xnbdd.backends.fill import CacheFill
from xnbdd.remote import RemoteLink, open_remote_link

log = logging.getLogger(__name__)

BULK_BYTES_IN_FLIGHT = 8 << 20  # bytes requested but not yet stored, own connection
BULK_SHARED_REQUESTS = 2  # requests in flight on the clients' connection (origin allows one)
STATUS_SPAN = 1 << 30  # bytes of the origin's allocation asked about at once

ProgressCallback = Callable[[int, int], None]  # (cached blocks, total blocks)


class AllocationHint:
    """The origin's allocation of the first ``STATUS_SPAN`` bytes from the first uncached block,
    asked for when the proxy connects. Safe to use later: a proxy rests on an origin that does
    not change under it (its cached blocks are kept for ever on that ground too)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.extents: list[tuple[int, int]] | None = None  # None: the origin cannot tell
        self.failed = False
        self.answered = trio.Event()

    @classmethod
    def at_first_uncached(cls, proxy: Fillable) -> AllocationHint | None:
        """A hint for ``proxy``'s first uncached block; None when every block is cached."""
        first = first_uncached(proxy, 0)
        return None if first is None else cls(first * BLOCK_SIZE)

    async def ask(self, link: RemoteLink, size: int) -> None:
        """Ask (once) about up to STATUS_SPAN bytes of a disk of ``size`` bytes."""
        span = min(STATUS_SPAN, size - self.offset)
        try:
            self.extents = await link.block_status(self.offset, span)
        except OSError as exc:  # cache-all asks again
            log.debug("early block status of the origin failed: %s", exc)
            self.failed = True
        finally:
            self.answered.set()

    def covers(self, offset: int) -> bool:
        """Whether the answer (once in) tells of ``offset``."""
        if offset < self.offset or self.failed:
            return False
        return not self.answered.is_set() or self.extents is None or offset < self.end

    @property
    def end(self) -> int:
        return self.offset + sum(length for length, _flags in self.extents or ())


class Fillable(Protocol):
    """What cache-all needs of the proxy."""

    @property
    def size(self) -> int: ...

    nblocks: int

    def uncached_runs(self, first: int, stop: int) -> Iterator[tuple[int, int]]: ...

    def cached_blocks(self) -> int: ...

    def is_complete(self) -> bool: ...

    fill: CacheFill

    async def flush(self) -> None: ...


def first_uncached(proxy: Fillable, start: int) -> int | None:
    """The first block at or after ``start`` that ``proxy`` has not cached; None if none."""
    return next((a for a, _b in proxy.uncached_runs(start, proxy.nblocks)), None)


class CacheAll:
    """One cache-all run over ``proxy``, whose clients use ``link``."""

    def __init__(
        self,
        proxy: Fillable,
        link: RemoteLink,
        per_request: int,
        progress: ProgressCallback | None,
        hint: AllocationHint | None = None,
    ) -> None:
        self._proxy = proxy
        self._link = link
        self._hint = hint
        self._per_request = per_request
        self._progress = progress
        self._window = max(1, BULK_BYTES_IN_FLIGHT // (per_request * BLOCK_SIZE))
        self.bulk: RemoteLink | None = None  # the run's own origin connection, once open

    async def run(self) -> None:
        """Returns once every block is cached and durable."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hold_bulk_link)
            await self._copy_rest()
            nursery.cancel_scope.cancel()
        await self._proxy.flush()
        if self._progress is not None:
            self._progress(self._proxy.cached_blocks(), self._proxy.nblocks)

    async def _hold_bulk_link(self) -> None:
        link = self._link
        try:
            async with open_remote_link(
                link.address,
                timeout=link.timeout,
                connect_timeout=3.0,
                expected_size=self._proxy.size,
            ) as bulk:
                self.bulk = bulk
                try:
                    await trio.sleep_forever()
                finally:
                    self.bulk = None
        except OSError as exc:
            log.info("cache-all uses the clients' origin connection (%s)", exc)
            self._window = BULK_SHARED_REQUESTS

    async def _copy_rest(self) -> None:
        proxy, per_request, progress = self._proxy, self._per_request, self._progress
        in_flight = 0
        room = trio.Event()
        last_report = -1.0

        async def fill_window(first: int, stop: int, zero: bool) -> None:
            nonlocal in_flight, room, last_report
            try:
                link = self.bulk or self._link
                max_request = (stop - first if zero else per_request) * BLOCK_SIZE
                await proxy.fill.ensure_cached(
                    first, stop, link, max_request, store=True, zero=zero, background=True
                )
            finally:
                in_flight -= 1
                room.set()
            now = trio.current_time()
            if progress is not None and now - last_report >= 0.1:
                last_report = now
                progress(proxy.cached_blocks(), proxy.nblocks)

        while not proxy.is_complete():
            try:
                async with trio.open_nursery() as nursery:
                    pos = 0
                    while pos < proxy.nblocks:
                        runs = await self._origin_runs(self.bulk or self._link, pos)
                        for run_first, run_stop, zero in runs:
                            step = run_stop - run_first if zero else per_request
                            for window in range(run_first, run_stop, step):
                                window_stop = min(window + step, run_stop)
                                for first, stop in proxy.uncached_runs(window, window_stop):
                                    while in_flight >= self._window:
                                        room = trio.Event()
                                        await room.wait()
                                    in_flight += 1
                                    nursery.start_soon(fill_window, first, stop, zero)
                        pos = runs[-1][1] if runs else proxy.nblocks
            except* OSError as group:
                raise group.exceptions[0] from None
            # blocks another task held busy may still be missing: go round again

    async def _origin_runs(self, link: RemoteLink, start: int) -> list[tuple[int, int, bool]]:
        """Block runs (first, stop, zero) from the first uncached block at or after ``start``:
        ``zero`` where the origin says whole blocks read as zeros. One BLOCK_STATUS over up to
        STATUS_SPAN bytes; an origin that cannot tell gets everything as data. Empty when
        nothing from ``start`` on is uncached."""
        proxy = self._proxy
        first = first_uncached(proxy, start)
        if first is None:
            return []
        size = proxy.size
        offset = first * BLOCK_SIZE
        span = min(STATUS_SPAN, size - offset)
        hint, self._hint = self._hint, None  # one use: later stretches are asked afresh
        if hint is not None and hint.covers(offset):
            await hint.answered.wait()
        if hint is not None and hint.covers(offset):  # asked again: the answer is in now
            offset, extents = hint.offset, hint.extents
        else:
            try:
                extents = await link.block_status(offset, span)
            except OSError as exc:  # the fetches will tell if the origin is gone; this is data
                log.warning("origin block status at %d failed (%s): fetching it all", offset, exc)
                return [(first, nblocks_for(offset + span), False)]
        if extents is None:
            return [(first, proxy.nblocks, False)]
        zeros, end = zero_blocks(offset, extents, size)
        runs: list[tuple[int, int, bool]] = []
        block = first  # runs cover [first, block)
        for a, b in zeros:
            if b <= first:  # the hint may start before ``first``
                continue
            a = max(a, first)
            if a > block:
                runs.append((block, a, False))
            runs.append((a, b, True))
            block = b
        known = nblocks_for(end) if end >= size else end // BLOCK_SIZE
        if max(known, first + 1) > block:  # an answer shorter than a block: fetch one
            runs.append((block, max(known, first + 1), False))
        return runs
