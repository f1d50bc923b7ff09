"""The sparse-aware proxy against real origins: cache-all asks the origin's base:allocation and
caches its zero ranges without fetching them (nbdkit's log filter counts what is fetched)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from tests.origin_servers import nbd_server, nbdkit, qemu_nbd, random_image, sparse_image
from xnbdd.backends.base import Extent
from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap
from xnbdd.backends.proxy import ProxyBackend, open_proxy_backend
from xnbdd.dial import RemoteAddress

SIZE = 16 << 20
EXTENT = 1 << 20
NBLOCKS = SIZE // BLOCK_SIZE
B = BLOCK_SIZE


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the file's data as SEEK_DATA/SEEK_HOLE see it."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


async def zero_flags(proxy: ProxyBackend) -> list[tuple[int, int]]:
    """The byte runs the proxy's base:allocation calls zero, over the whole export."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < proxy.size:
        for extent in await proxy.block_status(pos, proxy.size - pos):
            if extent.zero:
                if runs and runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], pos + extent.length)
                else:
                    runs.append((pos, pos + extent.length))
            pos += extent.length
    return runs


def holes_of(size: int, data_at: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    pos = 0
    for start in data_at:
        if start > pos:
            runs.append((pos, start))
        pos = start + EXTENT
    if pos < size:
        runs.append((pos, size))
    return runs


async def test_cache_all_fetches_only_the_data_and_punches_the_rest(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=3)
    cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
    # a cache file with stale bytes everywhere: zero ranges must really become zeros
    cache.write_bytes(b"\xa5" * SIZE)
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            await proxy.cache_all(31)
            assert proxy.is_complete()
            status = proxy.status()
            assert status.zeroed_blocks == (SIZE - len(data_at) * EXTENT) // B
            assert status.fetched_blocks == len(data_at) * EXTENT // B
            assert await proxy.read(0, SIZE) == data
            # cached: the cache file's allocation says the same
            assert await zero_flags(proxy) == holes_of(SIZE, data_at)
        fetched = sorted(origin.reads())
        assert sum(length for _offset, length in fetched) == len(data_at) * EXTENT
        assert {offset // EXTENT * EXTENT for offset, _n in fetched} == set(data_at)
    assert cache.read_bytes() == data
    assert data_ranges(cache) == _merged(data_at)  # the stale bytes were punched out
    on_disk = Bitmap.open(str(bitmap), NBLOCKS, readonly=True)
    try:
        assert on_disk.all_set(0, NBLOCKS)
    finally:
        on_disk.close()


def _merged(data_at: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for start in data_at:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + EXTENT)
        else:
            runs.append((start, start + EXTENT))
    return runs


async def test_block_status_of_uncached_ranges_is_the_origins_and_caches_its_zeros(
    tmp_path: Path,
) -> None:
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=9)
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            assert proxy.status().remote_allocation
            await proxy.read(data_at[0], B)  # one cached data block in the middle
            assert await zero_flags(proxy) == holes_of(SIZE, data_at)
            # the zeros the origin named are cached now, without a fetch
            zero_blocks = (SIZE - len(data_at) * EXTENT) // B
            assert proxy.cached_blocks() == zero_blocks + 1
            assert await proxy.read(0, SIZE) == data
            assert await zero_flags(proxy) == holes_of(SIZE, data_at)  # from the cache now
        assert sum(length for _offset, length in origin.reads()) == len(data_at) * EXTENT


async def test_writes_into_holes_survive_cache_all_and_trim_still_works(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=4)
    hole = holes_of(SIZE, data_at)[0][0]
    expect = bytearray(data)
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            await proxy.write(hole + 100, b"before", fua=False)  # uncached hole: head fetched
            expect[hole + 100 : hole + 106] = b"before"
            await proxy.cache_all(31)
            assert await proxy.read(0, SIZE) == expect
            # a hole cached without a fetch takes writes, inline or not
            await proxy.write(hole + 5 * B + 1, b"after", fua=True)
            expect[hole + 5 * B + 1 : hole + 5 * B + 6] = b"after"
            await proxy.trim(data_at[0], 2 * B, fua=False)
            expect[data_at[0] : data_at[0] + 2 * B] = bytes(2 * B)
            await proxy.zero(data_at[0] + 3 * B, B, may_trim=False, fast=False, fua=False)
            expect[data_at[0] + 3 * B : data_at[0] + 4 * B] = bytes(B)
            assert await proxy.read(0, SIZE) == expect


async def test_origin_without_structured_replies_is_fetched_whole(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data, _data_at = sparse_image(image, SIZE, extent=EXTENT, seed=5)
    with nbdkit(tmp_path, ["file", str(image)], log=True, options=("--no-sr",)) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            assert not proxy.status().remote_allocation
            extents = await proxy.block_status(0, SIZE)  # cannot tell: data
            assert not extents[0].zero and not extents[0].hole
            await proxy.cache_all(31)
            assert proxy.status().zeroed_blocks == 0
            assert await proxy.read(0, SIZE) == data
        assert sum(length for _offset, length in origin.reads()) == SIZE


async def test_qemu_nbd_origin_sparse_cache_all(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=6)
    with qemu_nbd(tmp_path, image) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            assert proxy.status().remote_allocation
            await proxy.cache_all(31)
            assert proxy.status().fetched_blocks == len(data_at) * EXTENT // B
            assert await proxy.read(0, SIZE) == data
            assert await zero_flags(proxy) == holes_of(SIZE, data_at)


async def test_concurrent_reads_during_sparse_cache_all(tmp_path: Path) -> None:
    """Client reads of holes and data race cache-all's zeroing and fetching: every answer is
    the origin's bytes, and nothing is fetched twice."""
    image = tmp_path / "origin.img"
    data, _data_at = sparse_image(image, SIZE, extent=EXTENT, seed=8)
    with nbdkit(
        tmp_path, ["file", str(image), "rdelay=5ms"], log=True, filters=("delay",)
    ) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.cache_all, 8)
                for offset in range(0, SIZE, EXTENT // 2):
                    assert await proxy.read(offset, 3 * B) == data[offset : offset + 3 * B]
            assert proxy.is_complete()
            assert await proxy.read(0, SIZE) == data
        blocks = [b for o, n in origin.reads() for b in range(o // B, (o + n) // B)]
        assert len(blocks) == len(set(blocks))


async def test_block_status_errors_fall_back_to_fetching(tmp_path: Path) -> None:
    """An origin that offers base:allocation but fails every BLOCK_STATUS (nbdkit's error
    filter): cache-all fetches everything, block status through the proxy says data."""
    image = tmp_path / "origin.img"
    data, _data_at = sparse_image(image, SIZE, extent=EXTENT, seed=10)
    with nbdkit(
        tmp_path,
        ["file", str(image), "error-extents-rate=100%", "error-extents=EIO"],
        filters=("error",),
        log=True,
    ) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            assert proxy.status().remote_allocation
            [extent] = await proxy.block_status(0, SIZE)
            assert extent == Extent(SIZE)
            await proxy.cache_all(31)
            assert proxy.status().zeroed_blocks == 0
            assert await proxy.read(0, SIZE) == data
        assert sum(length for _offset, length in origin.reads()) == SIZE


async def test_block_status_with_the_origin_down_answers_data_at_once(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    sparse_image(image, SIZE, extent=EXTENT, seed=11)
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm"), timeout=30.0
        ) as proxy:
            origin.kill()
            while proxy.status().remote_state == "connected":  # the link notices the close
                await trio.sleep(0.01)
            with trio.fail_after(5):  # not the 30 s the origin link would wait
                assert await proxy.block_status(0, SIZE) == [Extent(SIZE)]


async def test_nbd_server_origin(tmp_path: Path) -> None:
    """nbd-server 3.24 (Debian 12) has no structured replies, so no block status: the proxy
    fetches everything, as before. (One that answers base:allocation gets only its data
    fetched.)"""
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=12)
    with nbd_server(tmp_path, image) as origin:
        address = RemoteAddress(origin.host, origin.port, "disk")
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            await proxy.cache_all(31)
            status = proxy.status()
            fetched = len(data_at) * EXTENT // B if status.remote_allocation else NBLOCKS
            assert status.fetched_blocks == fetched
            assert status.zeroed_blocks == NBLOCKS - fetched
            assert await proxy.read(0, SIZE) == data


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


async def test_cache_all_uses_the_allocation_asked_at_connect(tmp_path: Path) -> None:
    """The proxy asks the origin's allocation when it connects (AllocationHint); cache-all then
    plans its first stretch from that answer instead of waiting a round trip for its own."""
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=5)
    cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            await _until(lambda: origin.extents_requests() == 1)  # asked before cache-all
            await proxy.cache_all(31)
            status = proxy.status()
            assert status.fetched_blocks == len(data_at) * EXTENT // B
            assert status.zeroed_blocks == (SIZE - len(data_at) * EXTENT) // B
            assert await proxy.read(0, SIZE) == data
        assert origin.extents_requests() == 1


async def test_allocation_asked_at_connect_is_clipped_to_what_is_still_uncached(
    tmp_path: Path,
) -> None:
    """Blocks a client cached after the early answer are neither fetched again nor zeroed."""
    image = tmp_path / "origin.img"
    data, data_at = sparse_image(image, SIZE, extent=EXTENT, seed=6)
    read_end = data_at[0] + EXTENT + 3 * B  # the first data extent, its holes before, 3 after
    cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            await _until(lambda: origin.extents_requests() == 1)
            assert await proxy.read(0, read_end) == data[:read_end]
            await proxy.cache_all(31)
            status = proxy.status()
            holes_after = sum(max(0, b - max(a, read_end)) for a, b in holes_of(SIZE, data_at))
            assert status.zeroed_blocks == holes_after // B
            assert status.fetched_blocks == (SIZE - holes_after) // B
            assert await proxy.read(0, SIZE) == data
        assert origin.extents_requests() == 1


async def test_reconnect_forgets_the_old_origins_allocation(tmp_path: Path) -> None:
    """After a reconnect the early answer of the first origin is not used: its holes are data
    on the second one."""
    sparse, dense = tmp_path / "sparse.img", tmp_path / "dense.img"
    sparse_image(sparse, SIZE, extent=EXTENT, seed=7)
    data = random_image(dense, SIZE, seed=8)
    cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
    with (
        nbdkit(tmp_path, ["file", str(sparse)], log=True) as first,
        nbdkit(tmp_path, ["file", str(dense)]) as second,
    ):
        address = RemoteAddress(first.host, first.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            await _until(lambda: first.extents_requests() == 1)
            await proxy.reconnect(RemoteAddress(second.host, second.port))
            await proxy.cache_all(31)
            assert proxy.status().zeroed_blocks == 0
            assert await proxy.read(0, SIZE) == data
