"""Proxy mode: serve an origin NBD server's disk while copying it into a local cache image.

The cache image holds byte *o* of the origin at byte *o*; the bitmap says which 4096-byte blocks
of it are valid (docs/compat.md §4.1, §4.2). Rules kept here (docs/decisions.md D14, D17, D22):

- A bit is set in memory only after its block's data is in the cache file, and persisted only
  after that data is durable: ``flush`` captures the dirty bits, fdatasyncs the cache, then
  writes the captured bits. After a crash every block marked cached holds the origin's data or
  an acknowledged write.
- A block is *busy* while one task fetches or writes it: that task holds a range lock over it
  (backends/rangelock.py) and others wait for the release. So a block missing for several
  clients is fetched once, and a fetch can never land on top of a newer write. Adjacent missing
  blocks go to the origin as one bounded request (backends/fill.py does the fetching).
- Writes, trims and zeroes never reach the origin. A partial write fetches only its head and tail
  blocks. A trim punches whole blocks and marks them cached (they read as zeros, which TRIM
  allows), so a trimmed block is never fetched again.
- The exported size is the origin's. It is recorded in a sidecar file next to the bitmap
  (backends/sidecar.py) and a cache/bitmap pair of another size is refused unless cleared.
- A read never fails because caching failed (a full or failing cache file system): the data
  fetched for it is served, its blocks stay uncached, and the failure is logged when it starts
  and when caching works again. Writes, CACHE and cache-all do report the error (ENOSPC).
- ``cache_all`` copies the rest in the background over its own origin connection, with a bounded
  number of requests and stores in flight, so client I/O never queues behind it (cache_all.py).
- Sparse origins (docs/data-path.md "The sparse-aware proxy"): when the origin answers
  ``base:allocation``, cache-all asks it which ranges read as zeros (NBD_STATE_ZERO) and caches
  their whole blocks without fetching them: the cache range is zeroed (a punched hole where the
  file system can), then the bits are set, and persisted by the same flush order as fetched
  data. A set bit keeps its meaning: the cache holds the origin's bytes, zeros included.
  Block status through the proxy answers cached ranges from the cache's allocation and the
  others from the origin (allocated data when the origin cannot tell).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from xnbdd.backends.base import (
    MAX_EXTENTS,
    Backend,
    CacheStore,
    Capabilities,
    Extent,
    FileRange,
    PipedPayload,
)
from xnbdd.backends.bitmap import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    BYTE_SHIFT,
    IN_BLOCK,
    Bitmap,
    block_span,
    nblocks_for,
)
from xnbdd.backends.blocks import (
    block_bytes,
    fill_edges,
    flush_data_then_bitmap,
    missing_edges,
    present_runs,
    whole_blocks,
    zero_blocks,
)
from xnbdd.backends.cache_all import AllocationHint, CacheAll, ProgressCallback
from xnbdd.backends.file import FileBackend
from xnbdd.backends.fill import MAX_FETCH, CacheFill, StartedFetch
from xnbdd.backends.rbd import RbdBackend, RbdCluster, is_rbd
from xnbdd.backends.sidecar import prepare_cache_files
from xnbdd.dial import RemoteAddress
from xnbdd.proto.consts import State
from xnbdd.remote import (
    DEFAULT_TIMEOUT,
    LinkState,
    RemoteLink,
    background_nursery,
    open_remote_link,
)

log = logging.getLogger(__name__)

SYNC_INTERVAL = 5.0  # seconds between background flushes of data + bitmap


@dataclass(frozen=True)
class ProxyStatus:
    size: int
    cache_path: str
    bitmap_path: str
    cached_blocks: int
    total_blocks: int
    remote: str
    remote_state: str
    remote_error: str
    remote_allocation: bool  # the origin answers base:allocation (cache-all skips its zeros)
    cache_all_running: bool
    fetched_blocks: int
    zeroed_blocks: int  # cached from the origin's allocation (zeros), never fetched

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class ProxyBackend:
    """The proxy cache as a ``Backend``. Create it with ``open_proxy_backend``."""

    def __init__(
        self,
        link: RemoteLink,
        cache: CacheStore,
        bitmap: Bitmap,
        *,
        cache_path: str,
        bitmap_path: str,
        readonly: bool,
        rbd: RbdCluster | None = None,
    ) -> None:
        self._link = link
        self._cache = cache
        self._bitmap = bitmap
        self._bits = bitmap.bits  # tested inline by the connections' threads (never cleared)
        self.cache_path = cache_path
        self.bitmap_path = bitmap_path
        self.readonly = readonly
        self._rbd = rbd or RbdCluster()
        self._size = link.size
        self.nblocks = nblocks_for(self._size)
        self.fill = CacheFill(cache, bitmap, self._size, cache_path)
        self._sync_lock = trio.Lock()
        self._cache_all: CacheAll | None = None
        self._cache_all_scope: trio.CancelScope | None = None
        self._allocation_hint: AllocationHint | None = None
        self._detached = False

    # -- Backend protocol ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        cache_caps = self._cache.capabilities
        return Capabilities(
            readonly=self.readonly,
            flush=True,
            fua=not self.readonly,
            trim=not self.readonly,
            zero=not self.readonly,
            fast_zero=not self.readonly and cache_caps.fast_zero,
            cache=True,
            multi_conn=True,  # one cache, one bitmap, one lock table for every connection
            shared_by_processes=False,  # the bitmap and lock table live in this process
            block_status=True,
        )

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        first, stop = block_span(offset, length)
        if not self._bitmap.all_set(first, stop):
            fetched = await self.fill.ensure_cached(first, stop, self._link, MAX_FETCH, store=False)
            if fetched is not None:  # the whole range came in one fetch: answer from it
                start = offset - first * BLOCK_SIZE
                return memoryview(fetched)[start : start + length]
            if not self._bitmap.all_set(first, stop):  # not stored: cached parts + origin
                return await self._read_around_cache(offset, length)
        return await self._cache.read(offset, length)

    async def _read_around_cache(self, offset: int, length: int) -> bytearray:
        """The range from the cache where it is cached and from the origin elsewhere (the
        cache could not take it)."""
        out = bytearray(length)
        for run_start, run_end, cached in present_runs(self._bitmap, offset, length):
            source = self._cache if cached else self._link
            out[run_start - offset : run_end - offset] = await source.read(
                run_start, run_end - run_start
            )
        return out

    # -- InlineIO: blocks already cached are read and rewritten by a connection's thread
    # without waiting. A bit is set only after its data is in the cache file and is never
    # cleared, and no fetch touches a cached block, so nothing on the event loop can overwrite
    # such a write with origin data; writes to uncached blocks take the async path (range locks).

    def _all_cached(self, offset: int, length: int) -> bool:
        if (offset & IN_BLOCK) + length <= BLOCK_SIZE:  # one block: every 4 KiB request
            # one bitmap byte, and mostly all of its 8 blocks cached: one comparison says it
            byte = self._bits[offset >> BYTE_SHIFT]
            return byte == 0xFF or bool(byte >> (offset >> BLOCK_SHIFT & 7) & 1)
        first, stop = block_span(offset, length)
        return self._bitmap.all_set(first, stop)

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        return self._cache.try_read(offset, length) if self._all_cached(offset, length) else None

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        return self._all_cached(offset, len(data)) and self._cache.try_write(offset, data)

    def is_hole(self, offset: int, length: int) -> bool:
        return False

    # -- StartsReads: a cold read's fetch leaves without waiting for a task (backends/fill.py)

    def start_read(self, offset: int, length: int) -> StartedFetch | None:
        return self.fill.start_read(self._link, offset, length)

    # -- PipeSink: the same for large writes, spliced into the cache file

    @property
    def takes_pipes(self) -> bool:
        return self._cache.takes_pipes

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        return self._all_cached(offset, length) and self._cache.try_write_piped(
            offset, length, payload
        )

    async def cache(self, offset: int, length: int) -> None:
        first, stop = block_span(offset, length)
        await self.fill.ensure_cached(first, stop, self._link, MAX_FETCH, store=True)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self._check_writable()
        length = len(memoryview(data).cast("B"))
        await self._modify(offset, length, lambda: self._cache.write(offset, data, fua=False))
        if fua:
            await self.flush()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        self._check_writable()

        async def zero_in_cache() -> None:
            await self._cache.zero(offset, length, may_trim=may_trim, fast=fast, fua=False)

        await self._modify(offset, length, zero_in_cache, fast=fast)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Punch whole blocks and mark them cached: they read as zeros, which TRIM allows, and
        an origin block that was trimmed never needs fetching. Partial blocks are left alone."""
        self._check_writable()
        if not self._cache.capabilities.trim:
            return  # advisory: the cache file system cannot punch holes
        first, stop = whole_blocks(offset, length, self._size)
        if first >= stop:
            return
        start_byte, stop_byte = block_bytes(first, stop, self._size)
        async with self.fill.locks.hold(first, stop):
            await self._cache.trim(start_byte, stop_byte - start_byte, fua=False)
            self.fill.mark_cached(first, stop)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Cache data durable first, then the bits that cover it (docs/decisions.md D14)."""
        async with self._sync_lock:
            self.fill.dirty = False
            await flush_data_then_bitmap(self._cache.flush, self._bitmap)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Cached blocks: the cache file's allocation; uncached ones: the origin's, or
        allocated data (status 0, always a safe answer) when the origin cannot tell or does
        not answer."""
        [(_start, run_end, cached)] = present_runs(self._bitmap, offset, length, limit=1)
        if cached:
            return await self._cache.block_status(offset, run_end - offset)
        extents = None
        if self._link.state is LinkState.CONNECTED:  # an origin that is down: no waiting
            try:
                extents = await self._link.block_status(offset, run_end - offset)
            except OSError as exc:
                log.debug("origin block status at %d failed (%s): answered as data", offset, exc)
        if extents is None:
            return [Extent(run_end - offset)]
        # The client asked; the origin says these blocks read as zeros: cache them now (no
        # fetch), so a later read or cache-all does not ask for them. Opportunistic: a failure
        # (or another task's failed fetch of some of them) leaves them uncached.
        try:
            for a, b in zero_blocks(offset, extents, self._size)[0]:
                await self.fill.ensure_cached(
                    a, b, self._link, (b - a) * BLOCK_SIZE, store=False, zero=True
                )
        except OSError as exc:
            log.debug("zeros at %d named by the origin not cached: %s", offset, exc)
        return [
            Extent(ext_len, hole=bool(flags & State.HOLE), zero=bool(flags & State.ZERO))
            for ext_len, flags in extents
        ]

    async def close(self) -> None:
        """Flush and release everything (not the cache image once handed to target mode)."""
        if self._detached:
            return
        self._detached = True
        if self._cache_all_scope is not None:
            self._cache_all_scope.cancel()
        failed: OSError | None = None
        try:
            await self.flush()
        except OSError as exc:  # e.g. a full file system: the bitmap cannot take the bits
            failed = exc
        finally:
            try:
                self._bitmap.close()  # tries the bits once more
            except OSError as exc:
                failed = exc
            else:
                failed = None
            await self._link.aclose()
            await self._cache.close()
        if failed is not None:
            # Still consistent on disk (a bit is written only after its data is durable): the
            # blocks whose bits are missing are fetched again, writes to them since the last
            # FLUSH are lost, as after a crash. Not a reason to fail the stop.
            log.error(
                "cache bitmap %s: bits not persisted at stop (%s); those blocks will be "
                "fetched from the origin again, writes to them since the last FLUSH are lost",
                self.bitmap_path,
                failed.strerror or failed,
            )

    # -- proxy specifics -----------------------------------------------------------------------

    def cached_blocks(self) -> int:
        return self._bitmap.count()

    def is_complete(self) -> bool:
        return self._bitmap.all_set(0, self.nblocks)

    def uncached_runs(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Runs [a, b) of blocks in [first, stop) the cache does not hold."""
        return self._bitmap.runs(first, stop, False)

    def cached_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``x-xnbd:cached`` view: (byte length, cached) runs covering [offset, offset+length),
        or a prefix of it in ``MAX_EXTENTS`` runs (extended headers ask for 64-bit ranges)."""
        runs = present_runs(self._bitmap, offset, length, limit=MAX_EXTENTS)
        return [(end - start, cached) for start, end, cached in runs]

    def status(self) -> ProxyStatus:
        return ProxyStatus(
            size=self._size,
            cache_path=self.cache_path,
            bitmap_path=self.bitmap_path,
            cached_blocks=self.cached_blocks(),
            total_blocks=self.nblocks,
            remote=self._link.description,
            remote_state=self._link.state.value,
            remote_error=self._link.last_error,
            remote_allocation=self._link.allocation,
            cache_all_running=self._cache_all_scope is not None,
            fetched_blocks=self.fill.fetched_blocks,
            zeroed_blocks=self.fill.zeroed_blocks,
        )

    async def reconnect(self, address: RemoteAddress) -> None:
        """Move to another origin of the same size (SizeMismatchError otherwise)."""
        self._allocation_hint = None  # another origin's answer is not this one's
        await self._link.reconnect(address)
        bulk = self._cache_all.bulk if self._cache_all is not None else None
        if bulk is not None:
            try:
                await bulk.reconnect(address)
            except OSError as exc:  # cache_all then fails after its timeout; it can be rerun
                log.warning("bulk connection could not follow the reconnect: %s", exc)

    async def cache_all(
        self, blocks_per_request: int = 31, progress: ProgressCallback | None = None
    ) -> None:
        """Fetch every uncached block; resumes from the bitmap; returns when complete and
        flushed. OSError if the origin stays unavailable. Client requests keep priority."""
        if blocks_per_request < 1:
            raise ValueError("blocks per request must be at least 1")
        if self._cache_all_scope is not None:
            raise RuntimeError("cache-all is already running")
        blocks_per_request = min(blocks_per_request, max(1, self._link.max_payload // BLOCK_SIZE))
        with trio.CancelScope() as scope:
            self._cache_all_scope = scope
            hint, self._allocation_hint = self._allocation_hint, None
            self._cache_all = CacheAll(self, self._link, blocks_per_request, progress, hint)
            try:
                await self._cache_all.run()
            finally:
                self._cache_all_scope = None
                self._cache_all = None
        if scope.cancelled_caught:
            raise OSError(errno.ECANCELED, "cache-all was stopped")

    async def ask_origin_allocation(self) -> None:
        """At the start, ask the origin what cache-all asks first (``AllocationHint``)."""
        hint = AllocationHint.at_first_uncached(self)
        if hint is not None and self._link.allocation:
            self._allocation_hint = hint
            await hint.ask(self._link, self._size)

    async def switch_to_target(self) -> Backend:
        """After the daemon drained every request: stop the proxy and hand over the cache image
        as a target backend (read-only if the proxy is). Data and bitmap are durable first; the
        bitmap file stays on disk. The caller checks ``is_complete`` (or was told to force), and
        closes the origin link with ``release_origin`` once clients go on."""
        if self._cache_all_scope is not None:
            self._cache_all_scope.cancel()
        await self.flush()
        self._detached = True
        self._bitmap.close()
        if not self.readonly:
            return self._cache
        await self._cache.close()
        return await trio.to_thread.run_sync(self._reopen_readonly)

    async def release_origin(self) -> None:
        """After ``switch_to_target``: a polite goodbye to the origin, which nothing uses any
        more. Not while clients wait at the pause: it took 1-3 ms of the switch."""
        await self._link.aclose()

    def _reopen_readonly(self) -> Backend:
        if is_rbd(self.cache_path):
            return RbdBackend.open(self.cache_path, self._rbd, readonly=True)
        return FileBackend.open(self.cache_path, readonly=True)

    # -- the block machinery -------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EPERM, "read-only export")

    async def _modify(
        self,
        offset: int,
        length: int,
        change: Callable[[], Awaitable[None]],
        *,
        fast: bool = False,
    ) -> None:
        """Run ``change`` (a write or zeroing of the cache) with the touched blocks locked, after
        fetching partially covered head and tail blocks that are not cached yet."""
        first, stop = block_span(offset, length)
        async with self.fill.locks.hold(first, stop):
            if fast and missing_edges(self._bitmap, offset, length, self._size):
                raise OSError(errno.ENOTSUP, "zeroing here needs a fetch from the origin")
            await fill_edges(self._bitmap, offset, length, self._size, self._fetch_edge)
            await change()
            self.fill.mark_cached(first, stop)

    async def _fetch_edge(self, first: int, stop: int) -> None:
        await self.fill.fetch_into_cache(self._link, first, stop)

    async def periodic_flush(self, interval: float = SYNC_INTERVAL) -> None:
        """Background task: make fetched blocks durable every ``interval`` seconds."""
        while not self._detached:
            await trio.sleep(interval)
            if self.fill.dirty and not self._detached:
                try:
                    await self.flush()
                except OSError as exc:
                    log.error("periodic flush of the proxy cache failed: %s", exc)


def open_cache(path: str, size: int, clear: bool, rbd: RbdCluster) -> CacheStore:
    """The cache image (blocking): a file prepare_cache_files made, or an RBD image."""
    if is_rbd(path):
        return RbdBackend.open_cache(path, rbd, size, clear=clear)
    return FileBackend.open(path, readonly=False)


@asynccontextmanager
async def open_proxy_backend(
    remote: RemoteAddress,
    cache_path: str,
    bitmap_path: str,
    *,
    readonly: bool = False,
    clear_bitmap: bool = False,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the origin link's per-request timeout)
    sync_interval: float = SYNC_INTERVAL,
    rbd: RbdCluster | None = None,  # how to reach the cluster of an rbd:POOL/IMAGE cache
) -> AsyncIterator[ProxyBackend]:
    """Connect to the origin, prepare the cache files and serve as a ``ProxyBackend`` inside the
    block. OSError when the origin cannot be reached, CacheMismatchError for a foreign cache."""
    async with open_remote_link(remote, timeout=timeout) as link, background_nursery() as nursery:
        bitmap = await trio.to_thread.run_sync(
            lambda: prepare_cache_files(
                cache_path, bitmap_path, link.size, clear=clear_bitmap, remote=link.description
            )
        )
        try:
            cache = await trio.to_thread.run_sync(
                open_cache, cache_path, link.size, clear_bitmap, rbd or RbdCluster()
            )
        except BaseException:
            bitmap.close()
            raise
        backend = ProxyBackend(
            link,
            cache,
            bitmap,
            cache_path=cache_path,
            bitmap_path=bitmap_path,
            readonly=readonly,
            rbd=rbd or RbdCluster(),
        )
        nursery.start_soon(backend.periodic_flush, sync_interval)
        nursery.start_soon(backend.ask_origin_allocation)
        try:
            yield backend
        finally:
            with trio.CancelScope(shield=True):
                await backend.close()
            nursery.cancel_scope.cancel()
