"""Data-plane worker processes (``xnbdd/workers.py``, ``xnbdd/worker.py``) in process: real
worker processes, real socket pairs, the production ``Connection`` path.

Connections start in the daemon; the second one at once makes the pool start its workers, and
both move out at a request boundary. Writes through workers land in the one image; a recall
brings every connection back (what a snapshot needs) and they move out again after it; a worker
killed with SIGKILL closes only its own client, and another worker takes its place.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.test_connection import wait_until
from tests.test_dataplane import Session, make_image, serving
from xnbdd.backends.file import FileBackend
from xnbdd.connection import ServerState
from xnbdd.export import Export
from xnbdd.proto.consts import Cmd
from xnbdd.workers import Workers, default_workers, start_message

SIZE = 8 << 20
STARTS_WITHIN = 30.0  # a worker is a fresh interpreter: slow on a loaded machine


@asynccontextmanager
async def pool(
    export: Export, count: int = 2, recall_timeout: float = 5.0
) -> AsyncIterator[tuple[ServerState, Workers]]:
    state = ServerState()
    workers = Workers(
        count, lambda: start_message(export, state.limits), state.stopping, lambda: recall_timeout
    )
    state.workers = workers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers.run)
        try:
            yield state, workers
        finally:
            nursery.cancel_scope.cancel()


async def write_and_read(session: Session, cookie: int, offset: int, data: bytes) -> None:
    client = session.client
    await client.send(client.write(cookie, offset, data))
    reply = await client.reply()
    assert (reply.cookie, reply.error) == (cookie, 0)
    await client.send(client.request(Cmd.READ, cookie + 1, offset, len(data)))
    reply = await client.reply()
    assert (reply.cookie, reply.error, reply.data) == (cookie + 1, 0, data)


async def test_connections_move_to_workers_and_back_for_a_recall(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, SIZE, seed=1)
    rng = random.Random(2)
    export = Export("", FileBackend.open(str(path), readonly=False))
    try:
        async with pool(export) as (state, workers), AsyncExitStack() as stack:
            sessions = [
                await stack.enter_async_context(serving(export, state=state)) for _ in (1, 2)
            ]
            conns = [s.conn for s in sessions]
            with trio.fail_after(STARTS_WITHIN):
                # the second connection at once started the workers; both moved out
                await wait_until(lambda: all(c.worker for c in conns), STARTS_WITHIN)
            pids = {c.worker for c in conns}
            assert len(pids) == 2, "the least loaded worker takes each connection"
            assert not pids & {os.getpid()}
            for n, session in enumerate(sessions):
                data = rng.randbytes(64 << 10)
                await write_and_read(session, 10 * n, n << 20, data)
                with open(path, "rb") as f:  # the file is the one truth
                    assert os.pread(f.fileno(), len(data), n << 20) == data

            # a request in flight while the recall starts is answered by the worker, then
            # the connection continues here at the boundary
            client = sessions[0].client
            data = rng.randbytes(256 << 10)
            await client.send(client.write(100, 3 << 20, data))
            async with workers.recalled():
                assert not workers.remote(), "every remote plane ended"
                await wait_until(lambda: all(c.worker is None for c in conns))
                assert (await client.reply()).cookie == 100
                for n, session in enumerate(sessions):
                    await write_and_read(session, 200 + 10 * n, (4 + n) << 20, rng.randbytes(4096))
            await wait_until(lambda: all(c.worker for c in conns), STARTS_WITHIN)
            await write_and_read(sessions[1], 300, 3 << 20, data)
    finally:
        await export.backend.close()


async def test_a_killed_worker_closes_only_its_own_clients(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, SIZE, seed=3)
    export = Export("", FileBackend.open(str(path), readonly=False))
    try:
        async with pool(export) as (state, workers), AsyncExitStack() as stack:
            sessions = [
                await stack.enter_async_context(serving(export, state=state)) for _ in (1, 2)
            ]
            await wait_until(lambda: all(s.conn.worker for s in sessions), STARTS_WITHIN)
            victim, survivor = sessions
            dead = victim.conn.worker
            assert dead is not None and dead != survivor.conn.worker
            os.kill(dead, signal.SIGKILL)
            await victim.client.closed()
            await victim.ended()
            await write_and_read(survivor, 1, 0, b"still here" * 100)
            # another worker takes the dead one's place, and serves a new connection
            await wait_until(
                lambda: (
                    len(workers.processes) == 2
                    and all(w.ready for w in workers.processes)
                    and dead not in {w.pid for w in workers.processes}
                ),
                STARTS_WITHIN,
            )
            async with serving(export, state=state) as late:
                await wait_until(lambda: late.conn.worker is not None, STARTS_WITHIN)
                await write_and_read(late, 5, 1 << 20, b"new worker" * 100)
    finally:
        await export.backend.close()


@pytest.mark.parametrize(("cpus", "expected"), [({0}, 0), ({0, 1}, 2), (set(range(32)), 8)])
def test_default_is_one_worker_per_usable_cpu_and_none_on_one(
    monkeypatch: pytest.MonkeyPatch, cpus: set[int], expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: cpus)
    assert default_workers() == expected


async def test_a_one_connection_daemon_starts_no_worker(tmp_path: Path) -> None:
    """One client gains nothing from another process: no worker starts for it."""
    path = tmp_path / "disk.img"
    make_image(path, SIZE, seed=4)
    export = Export("", FileBackend.open(str(path), readonly=False))
    try:
        async with pool(export) as (state, workers), serving(export, state=state) as session:
            await write_and_read(session, 1, 0, b"alone" * 100)
            assert session.conn.worker is None and not workers.processes
    finally:
        await export.backend.close()


async def test_a_recall_cuts_a_client_that_reads_no_replies(tmp_path: Path) -> None:
    """A client that never reads its replies cannot reach a request boundary: the recall cuts
    it after its timeout rather than wait for ever (or let its writes past a snapshot)."""
    path = tmp_path / "disk.img"
    make_image(path, SIZE, seed=5)
    export = Export("", FileBackend.open(str(path), readonly=False))
    try:
        async with pool(export, recall_timeout=0.5) as (state, workers), AsyncExitStack() as st:
            stuck, other = [
                await st.enter_async_context(serving(export, state=state)) for _ in "ab"
            ]
            await wait_until(lambda: bool(stuck.conn.worker and other.conn.worker), STARTS_WITHIN)
            client = stuck.client
            reads = b"".join(client.request(Cmd.READ, n, 0, 1 << 20) for n in range(64))
            await client.send(reads)  # 64 MiB of replies that are never read
            await wait_until(lambda: not client.holds_nothing())  # the worker took them
            with trio.fail_after(30):
                async with workers.recalled():
                    await stuck.ended()  # cut
                    await write_and_read(other, 1, 0, b"recalled" * 100)  # served here
            assert other.conn.worker is None or other.conn.worker != stuck.conn.worker
    finally:
        await export.backend.close()


async def test_a_reload_reaches_the_workers_and_they_report_what_they_hold(
    tmp_path: Path,
) -> None:
    """SIGHUP's new limits apply in every worker (each reports the limits it serves with), and
    the bytes a worker holds for a client that reads no replies count in the usage the
    daemon's query shows."""
    path = tmp_path / "disk.img"
    make_image(path, SIZE, seed=6)
    export = Export("", FileBackend.open(str(path), readonly=False))
    try:
        async with pool(export) as (state, workers), AsyncExitStack() as stack:
            sessions = [
                await stack.enter_async_context(serving(export, state=state)) for _ in (1, 2)
            ]
            await wait_until(lambda: all(s.conn.worker for s in sessions), STARTS_WITHIN)
            assert workers.usage() == (0, 0)

            state.limits.max_requests, state.limits.max_bytes = 7, 3 << 20
            workers.apply_limits(state.limits)
            with trio.fail_after(STARTS_WITHIN):
                while not all(
                    (w.usage.get("max_requests"), w.usage.get("max_bytes")) == (7, 3 << 20)
                    for w in workers.processes
                ):
                    await workers.next_report()

            client = sessions[0].client
            reads = b"".join(client.request(Cmd.READ, n, 0, 1 << 20) for n in range(4))
            await client.send(reads)  # 4 MiB of replies that are never read
            with trio.fail_after(STARTS_WITHIN):
                while workers.usage()[1] == 0:
                    await workers.next_report()
            requests, held = workers.usage()
            assert 1 <= requests <= 4 and 0 < held <= 4 << 20
            processes = [w._process for w in workers.processes]
        # told to end (the daemon closed its side), each exits by itself, not killed after a wait
        assert [p.returncode if p else None for p in processes] == [0, 0]
    finally:
        await export.backend.close()
