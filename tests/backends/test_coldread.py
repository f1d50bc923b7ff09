"""The proxy's cold read from a connection's thread (``backends/coldread.py``), end to end
in one process: a client on a real socket pair, the production data plane, the proxy, and a real
nbdkit origin. The fetch is sent by the plane's thread and answered from the origin reader on the
event loop; these tests check that path is taken, that its answers and cache are right, and
that every failure (an error reply, an origin that dies or stops answering) reaches the client
as EIO, never a hang, with the connection and the proxy still serving afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.origin_servers import nbdkit, random_image
from tests.test_connection import wait_until
from tests.test_dataplane import Reply, Session, serving
from xnbdd.backends.base import ReadDone
from xnbdd.backends.bitmap import BLOCK_SIZE as B
from xnbdd.backends.proxy import ProxyBackend, open_proxy_backend
from xnbdd.export import Export
from xnbdd.proto.consts import Cmd, Errno
from xnbdd.remote import RemoteAddress

SIZE = 4 << 20


class Started:
    """What ``start_read`` answered, call by call (the production method runs unchanged)."""

    def __init__(self) -> None:
        self.results: list[bool] = []

    def threaded(self) -> int:
        return sum(self.results)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Started:
    record = Started()
    original = ProxyBackend.start_read

    def spy(self: ProxyBackend, offset: int, length: int, done: ReadDone) -> bool:
        result = original(self, offset, length, done)
        record.results.append(result)
        return result

    monkeypatch.setattr(ProxyBackend, "start_read", spy)
    return record


@asynccontextmanager
async def proxied(
    tmp_path: Path, address: RemoteAddress, *, timeout: float = 30.0, structured: bool = False
) -> AsyncIterator[tuple[ProxyBackend, Session]]:
    async with (
        open_proxy_backend(
            address, str(tmp_path / "cache.img"), str(tmp_path / "cache.bm"), timeout=timeout
        ) as proxy,
        serving(Export("disk", proxy), structured=structured) as session,
    ):
        yield proxy, session


async def read(session: Session, cookie: int, offset: int, length: int) -> Reply:
    c = session.client
    await c.send(c.request(Cmd.READ, cookie, offset, length))
    return await c.reply()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
async def test_cold_reads_are_sent_by_the_plane_thread_and_cached_once(
    tmp_path: Path, started: Started, structured: bool
) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=11)
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        address = RemoteAddress(origin.host, origin.port)
        async with proxied(tmp_path, address, structured=structured) as (proxy, s):
            c = s.client
            # pipelined, unaligned, some overlapping: the overlapping ones find the blocks busy
            # (or cached) and take the event loop's path; each block is fetched once
            ranges = [(i * 3 * B + 100, 2 * B) for i in range(40)]
            ranges += [(5 * B, B), (60 * B + 7, 10), (200 * B, 64 * B)]
            await c.send(*(c.request(Cmd.READ, i, off, n) for i, (off, n) in enumerate(ranges)))
            got = await c.replies(len(ranges))
            for i, (off, n) in enumerate(ranges):
                assert got[i].error == 0 and got[i].data == data[off : off + n], i
            assert started.threaded() >= 40  # the plane's thread sent most of them itself
            fetched = [
                b
                for offset, length in origin.reads()
                for b in range(offset // B, (offset + length) // B)
            ]
            assert len(fetched) == len(set(fetched))  # no block fetched twice
            # now cached: answered inline, the origin sees nothing more
            before = len(origin.reads())
            reply = await read(s, 99, 100, 2 * B)
            assert reply.data == data[100 : 100 + 2 * B]
            assert len(origin.reads()) == before
            # stored right after the answers (or by a task, where the cache must wait)
            await wait_until(lambda: proxy.cached_blocks() == len(set(fetched)))
            await proxy.flush()
        cache = (tmp_path / "cache.img").read_bytes()
        for b in set(fetched):
            assert cache[b * B : (b + 1) * B] == data[b * B : (b + 1) * B]


async def test_a_write_racing_a_cold_read_is_never_overwritten_by_the_fetch(
    tmp_path: Path, started: Started
) -> None:
    """The cold read holds its blocks while the origin is slow: a WRITE to them waits for the
    fetch to be stored, then lands on top of it."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=12)
    with nbdkit(tmp_path, ["file", str(image), "rdelay=300ms"], filters=("delay",)) as origin:
        async with proxied(tmp_path, RemoteAddress(origin.host, origin.port)) as (proxy, s):
            c = s.client
            new = os.urandom(100)
            await c.send(c.request(Cmd.READ, 1, 8 * B, 2 * B), c.write(2, 9 * B + 50, new))
            got = await c.replies(2)
            assert started.results[:1] == [True]
            assert got[1].data == data[8 * B : 10 * B] and got[2] == Reply(2)
            reply = await read(s, 3, 8 * B, 2 * B)
            expected = bytearray(data[8 * B : 10 * B])
            expected[B + 50 : B + 150] = new
            assert reply.data == expected
            await proxy.flush()
        cache = (tmp_path / "cache.img").read_bytes()
        assert cache[8 * B : 10 * B] == expected


async def test_an_error_reply_fails_only_that_read(tmp_path: Path, started: Started) -> None:
    trigger = tmp_path / "fail-now"
    with nbdkit(
        tmp_path,
        ["memory", "4M", "error=EIO", "error-pread-rate=1", f"error-pread-file={trigger}"],
        filters=("error",),
    ) as origin:
        async with proxied(tmp_path, RemoteAddress(origin.host, origin.port)) as (proxy, s):
            trigger.touch()
            reply = await read(s, 1, 0, B)
            assert reply.error == Errno.EIO and started.results == [True]
            assert proxy.cached_blocks() == 0
            trigger.unlink()
            reply = await read(s, 2, 0, B)  # the same blocks, fetched again, same connection
            assert reply.error == 0 and reply.data == bytes(B)
            assert started.results == [True, True]
            await wait_until(lambda: proxy.cached_blocks() == 1)


async def test_origin_killed_mid_fetch_the_read_is_retried_on_the_next_connection(
    tmp_path: Path, started: Started
) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=13)
    with nbdkit(tmp_path, ["file", str(image), "rdelay=2"], filters=("delay",)) as first:
        port = int(first.port)
        address = RemoteAddress(first.host, first.port)
        async with proxied(tmp_path, address, timeout=10.0) as (proxy, s):
            c = s.client
            await c.send(c.request(Cmd.READ, 1, 4 * B, B))
            await wait_until(lambda: started.results == [True])
            await trio.sleep(0.2)  # the request reached the origin, which holds it
            first.kill()
            with nbdkit(tmp_path, ["file", str(image)], port=port):
                reply = await c.reply()  # lost with the connection, sent again on the next
                assert reply.error == 0 and reply.data == data[4 * B : 5 * B]
                reply = await read(s, 2, 6 * B, B)
                assert reply.error == 0 and reply.data == data[6 * B : 7 * B]
            await wait_until(lambda: proxy.cached_blocks() == 2)


async def test_origin_gone_for_good_the_client_gets_eio_within_the_timeout(
    tmp_path: Path, started: Started
) -> None:
    image = tmp_path / "origin.img"
    random_image(image, SIZE, seed=14)
    with nbdkit(tmp_path, ["file", str(image), "rdelay=2"], filters=("delay",)) as origin:
        async with proxied(tmp_path, RemoteAddress(origin.host, origin.port), timeout=1.0) as (
            proxy,
            s,
        ):
            c = s.client
            await c.send(c.request(Cmd.READ, 1, 0, B))
            await wait_until(lambda: started.results == [True])
            origin.kill()
            start = trio.current_time()
            reply = await c.reply()
            assert reply.error == Errno.EIO
            assert trio.current_time() - start < 5
            reply = await read(s, 2, B, B)  # down: fails, and the connection still answers
            assert reply.error == Errno.EIO
            assert proxy.cached_blocks() == 0


async def test_an_origin_that_stops_answering_gives_eio_after_the_timeout(
    tmp_path: Path, started: Started
) -> None:
    """No task waits for a thread's read: the origin connection's sweep fails it after the
    timeout and drops the stuck connection; once the origin answers again, reads work."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=15)
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        async with proxied(tmp_path, RemoteAddress(origin.host, origin.port), timeout=1.0) as (
            _proxy,
            s,
        ):
            assert (await read(s, 1, 0, B)).data == data[:B]
            origin.stop()
            try:
                start = trio.current_time()
                reply = await read(s, 2, 2 * B, B)
                assert reply.error == Errno.EIO and started.results == [True, True]
                assert 0.9 < trio.current_time() - start < 5
            finally:
                origin.cont()
            with trio.fail_after(10):
                while (reply := await read(s, 3, 2 * B, B)).error:
                    await trio.sleep(0.1)
            assert reply.data == data[2 * B : 3 * B]


async def test_switch_waits_for_a_cold_read_in_flight(tmp_path: Path, started: Started) -> None:
    """A cold read from the thread holds the export's gate until answered and its blocks until
    stored: the switch to target starts after it and hands over a cache holding it, durable."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=16)
    bitmap = tmp_path / "cache.bm"
    with nbdkit(tmp_path, ["file", str(image), "rdelay=300ms"], filters=("delay",)) as origin:
        async with open_proxy_backend(
            RemoteAddress(origin.host, origin.port), str(tmp_path / "cache.img"), str(bitmap)
        ) as proxy:
            export = Export("disk", proxy)
            async with serving(export) as s:
                c = s.client
                await c.send(c.request(Cmd.READ, 1, 0, B))
                await wait_until(lambda: started.results == [True])
                await export.replace_backend(proxy.switch_to_target)
                assert export.backend is not proxy
                reply = await c.reply()
                assert reply.data == data[:B]
                assert bitmap.read_bytes()[0] & 1  # stored, then flushed, then handed over
                assert (await read(s, 2, 0, B)).data == data[:B]  # from the target now
                await export.backend.close()
