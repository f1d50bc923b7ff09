"""Proxy mode: serve an origin NBD server's disk while copying it into a local cache image.

The cache image holds byte *o* of the origin at byte *o*; the bitmap says which 4096-byte blocks
of it are valid (docs/compat.md §4.1, §4.2). Rules kept here (docs/decisions.md D14, D17, D22):

- A bit is set in memory only after its block's data is in the cache file, and persisted only
  after that data is durable: ``flush`` captures the dirty bits, fdatasyncs the cache, then
  writes the captured bits. After a crash every block marked cached holds the origin's data or
  an acknowledged write.
- A block is *busy* while one task fetches or writes it; others wait on its ``trio.Event``. So a
  block missing for several clients is fetched once, and a fetch can never land on top of a newer
  write. Adjacent missing blocks go to the origin as one bounded request.
- Writes, trims and zeroes never reach the origin. A partial write fetches only its head and tail
  blocks. A trim punches whole blocks and marks them cached (they read as zeros, which TRIM
  allows), so a trimmed block is never fetched again.
- The exported size is the origin's. It is recorded in a sidecar file next to the bitmap and a
  cache/bitmap pair of another size is refused unless cleared.
- A read never fails because caching failed (a full or failing cache file system): the data
  fetched for it is served, its blocks stay uncached, and the failure is logged when it starts
  and when caching works again. Writes, CACHE and cache-all do report the error (ENOSPC).
- ``cache_all`` copies the rest in the background over its own origin connection, with a bounded
  number of requests in flight, so client fetches never queue behind the bulk copy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from xnbdd.backends.base import Capabilities, Extent, FileRange
from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, block_span, nblocks_for
from xnbdd.backends.file import MAX_EXTENTS, FileBackend
from xnbdd.remote import (
    DEFAULT_TIMEOUT,
    RemoteAddress,
    RemoteLink,
    background_nursery,
    open_remote_link,
)

log = logging.getLogger(__name__)

MAX_FETCH = 1 << 20  # bytes per origin request for client misses (bounded latency and memory)
BULK_BYTES_IN_FLIGHT = 8 << 20  # cache_all: bytes requested but not yet stored, own connection
BULK_SHARED_REQUESTS = 2  # cache_all on the clients' connection (origin allows only one)
SYNC_INTERVAL = 5.0  # seconds between background flushes of data + bitmap
SIDECAR_SUFFIX = ".xnbdd"
SIDECAR_FORMAT = "xnbdd-proxy-cache"

ProgressCallback = Callable[[int, int], None]  # (cached blocks, total blocks)


class CacheMismatchError(ValueError):
    """The cache image or bitmap belongs to an origin of another size."""


class _Busy:
    """A block range someone is fetching or writing; waiters learn how it ended."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: OSError | None = None  # a fetch that failed (not one that was cancelled)


@dataclass
class _BulkState:
    """cache-all's origin connection (None until open: the clients' one is used) and how many
    of its requests may be in flight."""

    window: int
    link: RemoteLink | None = None


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
    cache_all_running: bool
    fetched_blocks: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def sidecar_path(bitmap_path: str) -> str:
    return bitmap_path + SIDECAR_SUFFIX


def _read_sidecar(path: str) -> dict[str, object] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheMismatchError(f"{path}: unreadable cache metadata ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise CacheMismatchError(f"{path}: not an xnbdd cache metadata file")
    return data


def _write_sidecar(path: str, data: dict[str, object]) -> None:
    """Atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def prepare_cache_files(
    cache_path: str, bitmap_path: str, size: int, *, clear: bool, remote: str
) -> Bitmap:
    """Create or check the cache image and bitmap for an origin of ``size`` bytes (blocking).

    The image is created sparse (mode 0600) or extended to ``size``; a regular file larger than
    the origin, a bitmap of another size or a sidecar naming another size are refused unless
    ``clear`` (then the image is cut to size and the bitmap zeroed).
    """
    nblocks = nblocks_for(size)
    meta_path = sidecar_path(bitmap_path)
    meta = None if clear else _read_sidecar(meta_path)
    if meta is not None and meta.get("upstream_size") != size:
        raise CacheMismatchError(
            f"cache {cache_path} was made for an origin of {meta.get('upstream_size')} bytes, "
            f"but {remote} exports {size} bytes (use --clear-bitmap to start over)"
        )
    fd = os.open(cache_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_size > size and not clear:
                raise CacheMismatchError(
                    f"cache {cache_path} is {st.st_size} bytes, larger than the origin's "
                    f"{size} bytes (use --clear-bitmap to cut it to size and start over)"
                )
            if st.st_size != size:
                os.ftruncate(fd, size)  # sparse extension, or a cut with clear
                os.fsync(fd)
        elif not stat.S_ISBLK(st.st_mode):
            raise CacheMismatchError(f"cache {cache_path}: not a regular file or block device")
    finally:
        os.close(fd)
    try:
        bitmap = Bitmap.open(bitmap_path, nblocks, clear=clear)
    except ValueError as exc:
        raise CacheMismatchError(f"{exc} (use --clear-bitmap to start over)") from exc
    try:
        _write_sidecar(
            meta_path,
            {
                "format": SIDECAR_FORMAT,
                "version": 1,
                "upstream_size": size,
                "block_size": BLOCK_SIZE,
                "remote": remote,
            },
        )
    except BaseException:
        bitmap.close()
        raise
    return bitmap


class ProxyBackend:
    """The proxy cache as a ``Backend``. Create it with ``open_proxy_backend``."""

    def __init__(
        self,
        link: RemoteLink,
        cache: FileBackend,
        bitmap: Bitmap,
        *,
        cache_path: str,
        bitmap_path: str,
        readonly: bool,
    ) -> None:
        self._link = link
        self._cache = cache
        self._bitmap = bitmap
        self.cache_path = cache_path
        self.bitmap_path = bitmap_path
        self.readonly = readonly
        self._size = link.size
        self.nblocks = nblocks_for(self._size)
        self._busy: dict[int, _Busy] = {}
        self._sync_lock = trio.Lock()
        self._dirty = False  # bits set since the last flush
        self._bulk: RemoteLink | None = None
        self._cache_all_scope: trio.CancelScope | None = None
        self._detached = False
        self.fetched_blocks = 0
        self._store_error: OSError | None = None  # caching failing since (logged once)

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
            multi_conn=True,  # one cache, one bitmap, one busy table for every connection
            block_status=True,
        )

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        first, stop = block_span(offset, length)
        if not self._bitmap.all_set(first, stop):
            fetched = await self._ensure_cached(first, stop, self._link, MAX_FETCH, store=False)
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
        end = offset + length
        for run_offset, run_length, cached in self._runs(offset, length):
            start, stop = run_offset - offset, min(run_offset + run_length, end) - offset
            if cached:
                out[start:stop] = await self._cache.read(run_offset, stop - start)
            else:
                out[start:stop] = await self._link.read(run_offset, stop - start)
        return out

    # -- InlineIO: blocks already cached are read and rewritten by a connection's thread
    # without waiting. A bit is set only after its data is in the cache file and is never
    # cleared, and no fetch touches a cached block, so nothing on the event loop can overwrite
    # such a write with origin data; writes to uncached blocks take the async path (busy table).

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        first, stop = block_span(offset, length)
        if not self._bitmap.all_set(first, stop):
            return None
        return self._cache.try_read(offset, length)

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        first, stop = block_span(offset, len(data))
        return self._bitmap.all_set(first, stop) and self._cache.try_write(offset, data)

    def is_hole(self, offset: int, length: int) -> bool:
        return False

    async def cache(self, offset: int, length: int) -> None:
        first, stop = block_span(offset, length)
        await self._ensure_cached(first, stop, self._link, MAX_FETCH, store=True)

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
        end = offset + length
        first = -(-offset // BLOCK_SIZE)
        stop = nblocks_for(end) if end == self._size else end // BLOCK_SIZE
        if first >= stop:
            return
        start_byte = first * BLOCK_SIZE
        stop_byte = min(stop * BLOCK_SIZE, self._size)
        busy = await self._lock(first, stop)
        try:
            await self._cache.trim(start_byte, stop_byte - start_byte, fua=False)
            self._mark_cached(first, stop)
        finally:
            self._unlock(first, stop, busy)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Cache data durable first, then the bits that cover it (docs/decisions.md D14)."""
        async with self._sync_lock:
            self._dirty = False
            pending = self._bitmap.capture()
            await self._cache.flush()
            if pending is not None:
                await trio.to_thread.run_sync(self._bitmap.write_back, pending)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Cached blocks: the cache file's allocation; uncached ones: allocated data (status 0,
        always a safe answer, since the origin's allocation is not known here)."""
        first, stop = block_span(offset, length)
        cached = self._bitmap.test(first)
        run_stop = next(iter(self._bitmap.runs(first, stop, not cached)), (stop, stop))[0]
        run_length = min(run_stop * BLOCK_SIZE, offset + length) - offset
        if not cached:
            return [Extent(run_length)]
        return await self._cache.block_status(offset, run_length)

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

    def cached_extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``x-xnbd:cached`` view: (byte length, cached) runs covering [offset, offset+length),
        or a prefix of it in ``MAX_EXTENTS`` runs (extended headers ask for 64-bit ranges)."""
        runs = self._runs(offset, length, limit=MAX_EXTENTS)
        return [(run_length, cached) for _o, run_length, cached in runs]

    def _runs(
        self, offset: int, length: int, limit: int | None = None
    ) -> list[tuple[int, int, bool]]:
        """(byte offset, byte length, cached) runs covering [offset, offset+length), or the
        first ``limit`` of them."""
        end = offset + length
        first, stop = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        out: list[tuple[int, int, bool]] = []
        pos = first
        while pos < stop and (limit is None or len(out) < limit):
            cached = self._bitmap.test(pos)
            run_stop = next(iter(self._bitmap.runs(pos, stop, not cached)), (stop, stop))[0]
            start_byte = max(pos * BLOCK_SIZE, offset)
            out.append((start_byte, min(run_stop * BLOCK_SIZE, end) - start_byte, cached))
            pos = run_stop
        return out

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
            cache_all_running=self._cache_all_scope is not None,
            fetched_blocks=self.fetched_blocks,
        )

    async def reconnect(self, address: RemoteAddress) -> None:
        """Move to another origin of the same size (SizeMismatchError otherwise)."""
        await self._link.reconnect(address)
        if self._bulk is not None:
            try:
                await self._bulk.reconnect(address)
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
            try:
                await self._cache_all(blocks_per_request, progress)
            finally:
                self._cache_all_scope = None
        if scope.cancelled_caught:
            raise OSError(errno.ECANCELED, "cache-all was stopped")

    async def _cache_all(self, per_request: int, progress: ProgressCallback | None) -> None:
        """Fetch over a connection of its own (client misses keep theirs), opened while the
        first windows already go over the clients' connection: the link is busy from the
        first millisecond, not after a TCP and an NBD handshake."""
        bulk_window = max(1, BULK_BYTES_IN_FLIGHT // (per_request * BLOCK_SIZE))
        state = _BulkState(bulk_window)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hold_bulk_link, state)
            await self._copy_rest(state, per_request, progress)
            nursery.cancel_scope.cancel()
        await self.flush()
        if progress is not None:
            progress(self.cached_blocks(), self.nblocks)

    async def _hold_bulk_link(self, state: _BulkState) -> None:
        try:
            async with open_remote_link(
                self._link.address,
                timeout=self._link.timeout,
                connect_timeout=3.0,
                expected_size=self._size,
            ) as bulk:
                self._bulk = state.link = bulk
                try:
                    await trio.sleep_forever()
                finally:
                    self._bulk = state.link = None
        except OSError as exc:
            # the origin allows a single connection: share it, but keep few requests queued
            log.info("cache-all uses the clients' origin connection (%s)", exc)
            state.window = BULK_SHARED_REQUESTS

    async def _copy_rest(
        self, state: _BulkState, per_request: int, progress: ProgressCallback | None
    ) -> None:
        in_flight = 0
        room = trio.Event()
        last_report = -1.0

        async def fetch_window(first: int, stop: int) -> None:
            nonlocal in_flight, room, last_report
            try:
                link = state.link or self._link
                await self._ensure_cached(first, stop, link, per_request * BLOCK_SIZE, store=True)
            finally:
                in_flight -= 1
                room.set()
            now = trio.current_time()
            if progress is not None and now - last_report >= 0.1:
                last_report = now
                progress(self.cached_blocks(), self.nblocks)

        while not self.is_complete():
            try:
                async with trio.open_nursery() as nursery:
                    for window in range(0, self.nblocks, per_request):
                        window_stop = min(window + per_request, self.nblocks)
                        for first, stop in self._bitmap.runs(window, window_stop, False):
                            while in_flight >= state.window:
                                room = trio.Event()
                                await room.wait()
                            in_flight += 1
                            nursery.start_soon(fetch_window, first, stop)
            except* OSError as group:
                raise group.exceptions[0] from None
            # blocks another task held busy may still be missing: go round again

    async def switch_to_target(self) -> FileBackend:
        """After the daemon drained every request: stop the proxy and hand over the cache image
        as a target backend (read-only if the proxy is). Data and bitmap are durable first; the
        bitmap file stays on disk. The caller checks ``is_complete`` (or was told to force)."""
        if self._cache_all_scope is not None:
            self._cache_all_scope.cancel()
        await self.flush()
        self._detached = True
        self._bitmap.close()
        await self._link.aclose()
        if not self.readonly:
            return self._cache
        await self._cache.close()
        return FileBackend.open(self.cache_path, readonly=True)

    # -- the block machinery -------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EPERM, "read-only export")

    def _mark_cached(self, first: int, stop: int) -> None:
        self._bitmap.set_range(first, stop)
        self._dirty = True

    async def _lock(self, first: int, stop: int) -> _Busy:
        """Wait until no block of [first, stop) is busy, then mark them all busy for us."""
        while self._busy:
            waiting = next((self._busy[b] for b in range(first, stop) if b in self._busy), None)
            if waiting is None:
                break
            await waiting.done.wait()
        busy = _Busy()
        for block in range(first, stop):
            self._busy[block] = busy
        return busy

    def _unlock(self, first: int, stop: int, busy: _Busy) -> None:
        for block in range(first, stop):
            if self._busy.get(block) is busy:
                del self._busy[block]
        busy.done.set()

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
        end = offset + length
        first, stop = offset // BLOCK_SIZE, nblocks_for(end)
        busy = await self._lock(first, stop)
        try:
            partial: list[int] = []
            if offset % BLOCK_SIZE and not self._bitmap.test(first):
                partial.append(first)
            tail = stop - 1
            tail_partial = end % BLOCK_SIZE and end < self._size
            if tail_partial and tail not in partial and not self._bitmap.test(tail):
                partial.append(tail)
            if partial and fast:
                raise OSError(errno.ENOTSUP, "zeroing here needs a fetch from the origin")
            if len(partial) == 2 and partial[1] == partial[0] + 1:
                await self._fetch_into_cache(self._link, partial[0], partial[1] + 1)
            else:
                for block in partial:
                    await self._fetch_into_cache(self._link, block, block + 1)
            await change()
            self._mark_cached(first, stop)
        finally:
            self._unlock(first, stop, busy)

    async def _fetch_into_cache(
        self, link: RemoteLink, first: int, stop: int, *, store: bool = True
    ) -> bytearray:
        """Fetch blocks the caller holds busy, store them, then (only then) mark them cached;
        returns what was fetched. Without ``store``, a failure to store is logged and the
        blocks stay uncached (a read is served all the same)."""
        offset = first * BLOCK_SIZE
        length = min(stop * BLOCK_SIZE, self._size) - offset
        data = await link.read(offset, length)
        try:
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
        self._mark_cached(first, stop)
        self.fetched_blocks += stop - first
        return data

    async def _ensure_cached(
        self, first: int, stop: int, link: RemoteLink, max_request: int, *, store: bool
    ) -> bytearray | None:
        """Make [first, stop) cached: fetch the missing blocks nobody else is fetching (adjacent
        ones together, at most ``max_request`` bytes per request) and wait for the others.
        Returns the data when all of [first, stop) came in one fetch of ours, else None.
        ``store`` False: blocks the cache could not take are left uncached (no error) and the
        call returns after one round, so a full cache never makes it fetch in a loop."""
        per_request = max(1, max_request // BLOCK_SIZE)
        fetched_once = False
        while True:
            mine: list[tuple[int, int]] = []
            others: dict[_Busy, None] = {}  # ordered set
            take = _chunker(mine, per_request)
            for run_first, run_stop in self._bitmap.runs(first, stop, False):
                if not self._busy:
                    take(run_first, run_stop)
                    continue
                start = run_first
                for block in range(run_first, run_stop):
                    holder = self._busy.get(block)
                    if holder is not None:
                        take(start, block)
                        start = block + 1
                        others[holder] = None
                take(start, run_stop)
            if (not mine and not others) or (mine and fetched_once and not store):
                return None
            fetched_once = bool(mine)
            claims = [(a, b, self._claim(a, b)) for a, b in mine]
            if len(claims) == 1:
                data = await self._fetch_claimed(link, *claims[0], store=store)
                if not others and mine[0] == (first, stop):
                    return data
            elif claims:
                try:
                    async with trio.open_nursery() as nursery:
                        for claim in claims:
                            nursery.start_soon(
                                partial(self._fetch_claimed, store=store), link, *claim
                            )
                except* OSError as group:
                    raise group.exceptions[0] from None
            for holder in others:
                await holder.done.wait()
                if holder.error is not None:
                    raise OSError(holder.error.errno, str(holder.error))

    def _claim(self, first: int, stop: int) -> _Busy:
        busy = _Busy()
        for block in range(first, stop):
            self._busy[block] = busy
        return busy

    async def _fetch_claimed(
        self, link: RemoteLink, first: int, stop: int, busy: _Busy, *, store: bool
    ) -> bytearray:
        try:
            return await self._fetch_into_cache(link, first, stop, store=store)
        except OSError as exc:
            busy.error = exc
            raise
        finally:
            self._unlock(first, stop, busy)

    async def periodic_flush(self, interval: float = SYNC_INTERVAL) -> None:
        """Background task: make fetched blocks durable every ``interval`` seconds."""
        while not self._detached:
            await trio.sleep(interval)
            if self._dirty and not self._detached:
                try:
                    await self.flush()
                except OSError as exc:
                    log.error("periodic flush of the proxy cache failed: %s", exc)


def _chunker(out: list[tuple[int, int]], per_request: int) -> Callable[[int, int], None]:
    """A function appending [a, b) to ``out`` in pieces of at most ``per_request`` blocks."""

    def take(a: int, b: int) -> None:
        out.extend((c, min(c + per_request, b)) for c in range(a, b, per_request))

    return take


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
            cache = FileBackend.open(cache_path, readonly=False)
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
        )
        nursery.start_soon(backend.periodic_flush, sync_interval)
        try:
            yield backend
        finally:
            with trio.CancelScope(shield=True):
                await backend.close()
            nursery.cancel_scope.cancel()
