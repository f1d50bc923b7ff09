"""RangeLocks: the one lock type over block ranges that the cow overlay and the proxy cache use."""

from __future__ import annotations

import errno

import trio
import trio.testing

from xnbdd.backends.rangelock import RangeLocks


async def test_overlapping_ranges_exclude_each_other_and_disjoint_ones_do_not() -> None:
    locks = RangeLocks()
    order: list[str] = []
    first = await locks.acquire(0, 4)

    async def wants(name: str, start: int, stop: int) -> None:
        async with locks.hold(start, stop):
            order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wants, "overlapping", 3, 5)
        nursery.start_soon(wants, "disjoint", 4, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["disjoint"]  # [4, 8) never waited; [3, 5) waits for [0, 4)
        locks.release(first)
    assert order == ["disjoint", "overlapping"]
    assert first.done.is_set() and first.error is None


async def test_split_names_the_free_runs_and_the_holders() -> None:
    locks = RangeLocks()
    assert locks.split(0, 10) == ([(0, 10)], [])
    a = locks.claim(2, 4)
    b = locks.claim(6, 7)
    locks.claim(20, 30)  # outside the range asked about
    free, holders = locks.split(0, 10)
    assert free == [(0, 2), (4, 6), (7, 10)]
    assert holders == [a, b]
    free, holders = locks.split(3, 7)
    assert free == [(4, 6)]
    assert holders == [a, b]


async def test_a_failed_fetch_is_told_to_its_waiters() -> None:
    locks = RangeLocks()
    lock = locks.claim(0, 1)
    seen: list[OSError | None] = []

    async def waiter() -> None:
        await lock.done.wait()
        seen.append(lock.error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        locks.release(lock, OSError(errno.EIO, "origin gone"))
    assert len(seen) == 1 and seen[0] is not None and seen[0].errno == errno.EIO
    assert locks.split(0, 1) == ([(0, 1)], [])  # released: free again


async def test_hold_releases_on_error_without_blaming_waiters() -> None:
    locks = RangeLocks()
    try:
        async with locks.hold(0, 2) as lock:
            raise OSError(errno.ENOSPC, "full")
    except OSError:
        pass
    assert lock.done.is_set() and lock.error is None  # a failed write is not a failed fetch
    assert locks.split(0, 2) == ([(0, 2)], [])
