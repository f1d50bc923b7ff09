"""ProxyBackend against real origin servers (nbdkit with its log filter counts what we ask)."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import trio

from tests.origin_servers import nbdkit, qemu_nbd, random_image
from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap
from xnbdd.backends.file import FileBackend
from xnbdd.backends.fill import BACKGROUND_STORES, MAX_FETCH
from xnbdd.backends.proxy import open_proxy_backend
from xnbdd.backends.sidecar import CacheMismatchError, sidecar_path
from xnbdd.dial import RemoteAddress
from xnbdd.remote import SizeMismatchError

SIZE = 4 << 20
NBLOCKS = SIZE // BLOCK_SIZE
B = BLOCK_SIZE


def bits_on_disk(path: Path, nblocks: int = NBLOCKS) -> list[bool]:
    raw = path.read_bytes()
    return [bool(raw[i // 8] >> (i % 8) & 1) for i in range(nblocks)]


@pytest.fixture
def origin_image(tmp_path: Path) -> tuple[Path, bytes]:
    image = tmp_path / "origin.img"
    return image, random_image(image, SIZE, seed=7)


async def test_partial_reads_fetch_once_and_persist_exact_bits(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    cache, bitmap = tmp_path / "cache.img", tmp_path / "cache.bm"
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            assert proxy.size == SIZE and proxy.capabilities.multi_conn
            # 3 blocks touched by 100 bytes straddling a boundary, and 16 adjacent blocks
            assert await proxy.read(5 * B - 50, 100) == data[5 * B - 50 : 5 * B + 50]
            assert await proxy.read(10 * B + 1, 16 * B - 2) == data[10 * B + 1 : 26 * B - 1]
            assert origin.reads() == [(4 * B, 2 * B), (10 * B, 16 * B)]  # one request per run
            assert await proxy.read(4 * B, 22 * B) == data[4 * B : 26 * B]
            assert sorted(origin.reads()) == [(4 * B, 2 * B), (6 * B, 4 * B), (10 * B, 16 * B)]
            assert bits_on_disk(bitmap) == [False] * NBLOCKS  # nothing durable before a flush
            await proxy.flush()
            expected = [4 <= i < 26 for i in range(NBLOCKS)]
            assert bits_on_disk(bitmap) == expected
            assert proxy.cached_blocks() == 22
            assert proxy.cached_extents(0, 30 * B) == [
                (4 * B, False),
                (22 * B, True),
                (4 * B, False),
            ]
        assert os.stat(cache).st_mode & 0o777 == 0o600
        assert cache.read_bytes()[4 * B : 26 * B] == data[4 * B : 26 * B]
        # reopened: the bitmap is trusted, nothing is fetched again
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            assert await proxy.read(4 * B, 22 * B) == data[4 * B : 26 * B]
        assert len(origin.reads()) == 3


async def test_concurrent_cold_reads_fetch_each_block_once(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    with nbdkit(
        tmp_path, ["file", str(image), "rdelay=50ms"], log=True, filters=("delay",)
    ) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            results: list[bytes] = []

            async def reader(offset: int, length: int) -> None:
                results.append(bytes(await proxy.read(offset, length)))

            async with trio.open_nursery() as nursery:
                for i in range(8):  # overlapping ranges over blocks 0..39, all cold
                    nursery.start_soon(reader, i * 4 * B, 8 * B)
                    nursery.start_soon(reader, 0, 40 * B)
            assert results.count(data[: 40 * B]) == 8
        fetched = sorted(origin.reads())
        covered = [
            b for offset, length in fetched for b in range(offset // B, (offset + length) // B)
        ]
        assert sorted(covered) == list(range(40))  # every block exactly once


async def test_writes_stay_local_and_fetch_only_head_and_tail(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            await proxy.write(3 * B + 10, b"x" * (5 * B), fua=False)  # blocks 3..8, partial ends
            assert origin.reads() == [(3 * B, B), (8 * B, B)]
            await proxy.write(20 * B, b"y" * (2 * B), fua=True)  # aligned: no fetch
            assert len(origin.reads()) == 2
            expect = bytearray(data[: 30 * B])
            expect[3 * B + 10 : 8 * B + 10] = b"x" * (5 * B)
            expect[20 * B : 22 * B] = b"y" * (2 * B)
            assert await proxy.read(0, 30 * B) == expect
            await proxy.zero(40 * B + 1, B, may_trim=True, fast=False, fua=False)
            assert (
                await proxy.read(40 * B, 2 * B)
                == data[40 * B : 40 * B + 1] + bytes(B) + data[41 * B + 1 : 42 * B]
            )
            with pytest.raises(OSError) as info:  # fast zero never fetches
                await proxy.zero(50 * B + 1, B, may_trim=True, fast=True, fua=False)
            assert info.value.errno == errno.ENOTSUP
            await proxy.trim(60 * B + 5, 3 * B, fua=True)  # punches blocks 61, 62 only
            reads_before = len(origin.reads())
            assert await proxy.read(61 * B, 2 * B) == bytes(2 * B)
            assert len(origin.reads()) == reads_before  # trimmed = cached zeros
            assert Bitmap.open(str(tmp_path / "c.bm"), NBLOCKS, readonly=True).test(61)
            # the last block of an export that is not block-aligned is handled too
            await proxy.write(SIZE - 7, b"endbyte", fua=False)
            assert await proxy.read(SIZE - 10, 10) == data[SIZE - 10 : SIZE - 7] + b"endbyte"
        assert origin.writes() == 0
        assert image.read_bytes() == data


async def test_size_mismatch_is_refused_unless_cleared(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, _ = origin_image
    cache, bitmap = str(tmp_path / "c.img"), str(tmp_path / "c.bm")
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        async with open_proxy_backend(RemoteAddress(origin.host, origin.port), cache, bitmap) as p:
            await p.read(0, B)
    assert '"upstream_size": 4194304' in Path(sidecar_path(bitmap)).read_text()
    with nbdkit(tmp_path, ["memory", "8M"]) as other:
        address = RemoteAddress(other.host, other.port)
        with pytest.raises(CacheMismatchError, match="clear-bitmap"):
            async with open_proxy_backend(address, cache, bitmap):
                pass
        async with open_proxy_backend(address, cache, bitmap, clear_bitmap=True) as proxy:
            assert proxy.size == 8 << 20 and proxy.cached_blocks() == 0
            assert await proxy.read(0, B) == bytes(B)


async def test_cache_all_completes_resumes_and_switches(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            await proxy.read(100 * B, 10 * B)
            await proxy.write(200 * B, b"w" * B, fua=False)
            seen: list[tuple[int, int]] = []
            with trio.move_on_after(0.02):  # stopped early: the bitmap keeps what it got
                await proxy.cache_all(8, lambda c, t: seen.append((c, t)))
            partial = proxy.cached_blocks()
            await proxy.cache_all(8, lambda c, t: seen.append((c, t)))
            assert proxy.is_complete() and seen[-1] == (NBLOCKS, NBLOCKS)
            fetched = [b for o, n in origin.reads() for b in range(o // B, -(-(o + n) // B))]
            assert set(fetched) == set(range(NBLOCKS)) - {200}
            # only requests cut off by the cancellation were asked again
            assert len(fetched) - len(set(fetched)) <= (8 << 20) // B
            assert all(fetched.count(b) == 1 for b in range(100, 110))
            assert partial <= NBLOCKS
            target = await proxy.switch_to_target()
            assert bits_on_disk(bitmap) == [True] * NBLOCKS
            await proxy.release_origin()
        # the origin is gone; the handed-over backend still serves everything
        expect = bytearray(data)
        expect[200 * B : 201 * B] = b"w" * B
        assert await target.read(0, SIZE) == expect
        await target.write(0, b"after", fua=True)
        await target.close()


async def test_qemu_nbd_origin_and_single_connection_fallback(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    with qemu_nbd(tmp_path, image) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(
            address, str(tmp_path / "c.img"), str(tmp_path / "c.bm")
        ) as proxy:
            await proxy.cache_all(31)
            assert await proxy.read(0, SIZE) == data


async def test_origin_killed_mid_read_then_reconnect(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    image, data = origin_image
    with nbdkit(tmp_path, ["file", str(image)]) as first:
        async with open_proxy_backend(
            RemoteAddress(first.host, first.port),
            str(tmp_path / "c.img"),
            str(tmp_path / "c.bm"),
            timeout=1.0,
        ) as proxy:
            assert await proxy.read(0, B) == data[:B]
            first.stop()
            start = trio.current_time()
            with pytest.raises(OSError) as info:
                await proxy.read(B, B)
            assert info.value.errno == errno.EIO and trio.current_time() - start < 2.0
            first.kill()
            assert await proxy.read(0, B) == data[:B]  # cached blocks keep being served
            with nbdkit(tmp_path, ["memory", "1M"]) as wrong, pytest.raises(SizeMismatchError):
                await proxy.reconnect(RemoteAddress(wrong.host, wrong.port))
            with nbdkit(tmp_path, ["file", str(image)]) as second:
                await proxy.reconnect(RemoteAddress(second.host, second.port))
                assert proxy.status().remote == f"127.0.0.1:{second.port}"
                assert await proxy.read(B, 4 * B) == data[B : 5 * B]


CRASH_CHILD = textwrap.dedent(
    """
    import random, sys, trio
    sys.path.insert(0, {root!r})
    from xnbdd.backends.proxy import open_proxy_backend
    from xnbdd.dial import RemoteAddress

    async def main():
        journal = open({journal!r}, "a", buffering=1)
        rng = random.Random({seed})
        address = RemoteAddress("127.0.0.1", {port!r})
        async with open_proxy_backend(address, {cache!r}, {bitmap!r}, sync_interval=0.05) as proxy:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.cache_all, 4)
                seq = 0
                while True:
                    block = rng.randrange({nblocks})
                    seq += 1
                    journal.write(f"start {{block}} {{seq}}\\n")
                    payload = seq.to_bytes(8, "little") * 512
                    await proxy.write(block * 4096, payload, fua=rng.random() < 0.2)
                    journal.write(f"ack {{block}} {{seq}}\\n")
                    if rng.random() < 0.1:
                        await proxy.flush()
                    await trio.sleep(0.001 * rng.random())
    trio.run(main)
    """
)


def test_kill_9_never_exposes_a_wrong_block(tmp_path: Path) -> None:
    # big and slow enough that several kills land while cache-all still has fetches in flight
    # (the cache persists across rounds: a parallel origin let round 2 finish what round 1 began)
    size = 32 << 20
    nblocks = size // B
    image = tmp_path / "origin.img"
    data = random_image(image, size, seed=11)
    cache, bitmap, journal = tmp_path / "c.img", tmp_path / "c.bm", tmp_path / "journal"
    root = str(Path(__file__).resolve().parents[2])
    rng = random.Random(42)
    cached_counts: list[int] = []
    # noparallel: nbdkit 1.32 aborts ("sock >= 0") when a killed client leaves requests behind
    with nbdkit(
        tmp_path, ["file", str(image), "rdelay=20ms"], filters=("noparallel", "delay")
    ) as origin:
        for round_ in range(6):
            code = CRASH_CHILD.format(
                root=root,
                journal=str(journal),
                seed=round_,
                port=origin.port,
                cache=str(cache),
                bitmap=str(bitmap),
                nblocks=NBLOCKS,
            )
            before = cached_counts[-1] if cached_counts else 0
            child = subprocess.Popen([sys.executable, "-c", code])
            # kill once this round's cache-all has made progress (a loaded machine may take
            # seconds to start the child), at a random moment after that
            deadline = time.monotonic() + 120
            while not (bitmap.exists() and sum(bits_on_disk(bitmap, nblocks)) > before):
                assert child.poll() is None, "the proxy process ended by itself"
                assert time.monotonic() < deadline, "cache-all made no progress"
                time.sleep(0.02)
            time.sleep(rng.random() * 0.5)
            child.send_signal(signal.SIGKILL)
            child.wait()
            allowed: dict[int, set[bytes]] = {}
            for line in journal.read_text().splitlines():
                kind, written, seq = line.split()
                if kind == "start":  # an unacknowledged write may or may not have landed
                    allowed.setdefault(int(written), set()).add(
                        int(seq).to_bytes(8, "little") * 512
                    )
            bits = bits_on_disk(bitmap, nblocks)
            content = cache.read_bytes()
            cached_counts.append(sum(bits))
            for block in range(nblocks):
                if bits[block]:
                    got = content[block * B : (block + 1) * B]
                    ok = got == data[block * B : (block + 1) * B] or got in allowed.get(block, ())
                    assert ok, f"round {round_}: block {block} marked cached holds wrong data"
    assert "ack" in journal.read_text()
    # the kills really hit cache-all in progress, more than once
    assert cached_counts[0] > 0 and len({c for c in cached_counts if c < nblocks}) >= 2


async def test_cached_extents_of_a_long_fragmented_range_stop_at_max_extents(
    tmp_path: Path,
) -> None:
    """Extended headers ask for block status over 64-bit ranges: the ``x-xnbd:cached`` view
    answers a prefix in at most MAX_EXTENTS runs, however fragmented the bitmap is."""
    from xnbdd.backends.base import MAX_EXTENTS

    size = 2 * (MAX_EXTENTS + 8) * B
    image = tmp_path / "origin.img"
    with open(image, "wb") as f:
        f.truncate(size)
    cache, bitmap = tmp_path / "cache.img", tmp_path / "cache.bm"
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            for block in range(0, size // B, 2):  # every other block cached (trimmed)
                await proxy.trim(block * B, B, fua=False)
            runs = proxy.cached_extents(0, size)
            assert len(runs) == MAX_EXTENTS
            assert runs[:2] == [(B, True), (B, False)]
            assert sum(length for length, _cached in runs) == MAX_EXTENTS * B < size


async def test_cache_all_leaves_the_cache_threads_to_clients(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    """cache-all at one block per request has a window of 2048 fetches; its stores take one of
    BACKGROUND_STORES slots before they ask the cache file for a thread, so a client's write
    never queues behind a window of them (4-24 s in tests/e2e/test_fdstore.py before)."""
    image, data = origin_image
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        address = RemoteAddress(origin.host, origin.port)
        cache, bitmap = tmp_path / "c.img", tmp_path / "c.bm"
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            store = proxy._cache
            assert isinstance(store, FileBackend)
            store._inline = False  # worker threads, as on a disk (tmp_path may be tmpfs)
            writing = most = 0
            write = store.write

            async def counted(offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
                nonlocal writing, most
                writing += 1
                most = max(most, writing)
                try:
                    await write(offset, data, fua=fua)
                finally:
                    writing -= 1

            store.write = counted  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.cache_all, 1)
                await trio.sleep(0.05)
                with trio.fail_after(5):  # a client write while cache-all runs
                    await proxy.write(3 * B + 1, b"client", fua=False)
            assert proxy.is_complete()
            assert 1 < most <= BACKGROUND_STORES + 1  # cache-all's slots and the client
            expect = bytearray(data)
            expect[3 * B + 1 : 3 * B + 7] = b"client"
            assert await proxy.read(0, SIZE) == expect


async def test_a_cold_read_is_started_at_once_answered_then_stored(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    """``start_read`` sends the fetch without waiting; the client's slice is told as soon as
    it arrives, and ``result`` returns once the blocks are stored and marked cached. What
    needs more than one fresh fetch is declined (the caller uses ``read``)."""
    image, data = origin_image
    cache, bitmap = tmp_path / "cache.img", tmp_path / "cache.bm"
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with open_proxy_backend(address, str(cache), str(bitmap)) as proxy:
            started = proxy.start_read(5 * B - 50, 100)  # two blocks, one fetch
            assert started is not None
            assert proxy.start_read(5 * B, 10) is None  # being fetched: wait for it in read
            answers: list[bytes] = []
            started.when_data(lambda data: answers.append(bytes(data)))
            assert bytes(await started.result()) == data[5 * B - 50 : 5 * B + 50]
            assert answers == [data[5 * B - 50 : 5 * B + 50]]
            assert origin.reads() == [(4 * B, 2 * B)] and proxy.cached_blocks() == 2
            assert cache.read_bytes()[4 * B : 6 * B] == data[4 * B : 6 * B]
            assert proxy.start_read(4 * B, 10) is None  # cached
            assert proxy.start_read(5 * B, 2 * B) is None  # partly cached
            assert proxy.start_read(8 * B, MAX_FETCH + 1) is None  # more than one fetch
            assert await proxy.read(3 * B, 4 * B) == data[3 * B : 7 * B]
            assert sorted(origin.reads()) == [(3 * B, B), (4 * B, 2 * B), (6 * B, B)]


async def test_inline_io_answers_only_cached_blocks_bit_by_bit(
    tmp_path: Path, origin_image: tuple[Path, bytes]
) -> None:
    """The threads' inline path looks at one bitmap byte for a one-block request: a cached
    block beside uncached ones in the same byte is answered, its neighbours are not, and a
    request over two blocks needs both."""
    image, data = origin_image
    with (
        nbdkit(tmp_path, ["file", str(image)]) as origin,
        tempfile.TemporaryDirectory(dir="/dev/shm") as shm,  # writes inline: a memory fs
    ):
        address = RemoteAddress(origin.host, origin.port)
        cache, bitmap = f"{shm}/cache.img", f"{shm}/cache.bm"
        async with open_proxy_backend(address, cache, bitmap) as proxy:
            await proxy.read(5 * B, B)  # block 5 of the byte holding blocks 0-7
            assert proxy.try_read(5 * B + 10, 100) == data[5 * B + 10 : 5 * B + 110]
            for offset, length in ((4 * B, B), (6 * B + 1, 10), (5 * B + 10, B), (4 * B, 2 * B)):
                assert proxy.try_read(offset, length) is None
                assert not proxy.try_write(offset, bytes(length))
            await proxy.read(8 * B, 8 * B)  # a whole byte: blocks 8-15
            assert proxy.try_read(9 * B, 6 * B) == data[9 * B : 15 * B]
            assert proxy.try_write(12 * B + 7, b"new")
            assert (
                await proxy.read(12 * B, 16)
                == data[12 * B : 12 * B + 7] + b"new" + data[12 * B + 10 : 12 * B + 16]
            )
