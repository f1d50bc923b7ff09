"""The origin link against real NBD servers: styles, pipelining, errors, outages, reconnect."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.origin_servers import nbd_server, nbdkit, qemu_nbd, random_image
from xnbdd.dial import RemoteAddress
from xnbdd.remote import LinkState, SizeMismatchError, open_remote_link

SIZE = 1 << 20


@pytest.mark.parametrize("style", ["fixed-tcp", "fixed-unix", "oldstyle"])
async def test_reads_match_the_origin(tmp_path: Path, style: str) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(
        tmp_path, ["file", str(image)], unix=style == "fixed-unix", oldstyle=style == "oldstyle"
    ) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            assert link.size == SIZE and link.state is LinkState.CONNECTED
            assert link.structured is (style != "oldstyle")
            results: dict[int, bytes] = {}

            async def one(offset: int, length: int) -> None:
                results[offset] = bytes(await link.read(offset, length))

            async with trio.open_nursery() as nursery:  # many in flight at once
                for i in range(64):
                    nursery.start_soon(one, i * 12288 + 7, 4096 + i * 100)
            for i in range(64):
                offset = i * 12288 + 7
                assert results[offset] == data[offset : offset + 4096 + i * 100]


async def test_qemu_nbd_and_nbd_server_origins(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE, seed=3)
    with qemu_nbd(tmp_path, image) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            assert bytes(await link.read(4096, 8192)) == data[4096:12288]
    with nbd_server(tmp_path, image, "disk") as origin:
        address = RemoteAddress(origin.host, origin.port, "disk")
        async with open_remote_link(address) as link:
            assert link.size == SIZE
            assert bytes(await link.read(SIZE - 100, 100)) == data[-100:]


async def test_sparse_origin_reads_holes_as_zeros(tmp_path: Path) -> None:
    with nbdkit(tmp_path, ["memory", "4M"]) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            assert bytes(await link.read(0, 1 << 20)) == bytes(1 << 20)


async def test_unknown_export_fails_to_open(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    random_image(image, SIZE)
    with nbd_server(tmp_path, image, "disk") as origin, pytest.raises(OSError, match="UNKNOWN"):
        async with open_remote_link(RemoteAddress(origin.host, origin.port, "nope")):
            pass


async def test_error_reply_fails_only_that_request(tmp_path: Path) -> None:
    # nbdkit's error filter fails reads at offsets >= 512 KiB? It fails a fraction of all reads;
    # rate 1 with a file that triggers it only while it exists gives a deterministic switch.
    trigger = tmp_path / "fail-now"
    with nbdkit(
        tmp_path,
        ["memory", "1M", "error=EIO", "error-pread-rate=1", f"error-pread-file={trigger}"],
        filters=("error",),
    ) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            trigger.touch()
            with pytest.raises(OSError) as info:
                await link.read(0, 4096)
            assert info.value.errno == errno.EIO
            trigger.unlink()
            assert bytes(await link.read(0, 4096)) == bytes(4096)  # same connection, still fine
            assert link.state is LinkState.CONNECTED


async def test_origin_killed_mid_read_fails_within_timeout_then_reconnect(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as first:
        async with open_remote_link(
            RemoteAddress(first.host, first.port), timeout=1.0, backoff_max=0.2
        ) as link:
            assert bytes(await link.read(0, 4096)) == data[:4096]
            first.stop()  # hangs: the read below gets no answer
            start = trio.current_time()
            with pytest.raises(OSError) as info:
                await link.read(8192, 4096)
            assert info.value.errno == errno.EIO
            assert 0.9 < trio.current_time() - start < 2.0
            first.kill()
            with trio.fail_after(5):
                while link.state is not LinkState.FAILED:
                    await trio.sleep(0.05)
            with pytest.raises(OSError):  # known down: fails at once
                with trio.fail_after(0.5):
                    await link.read(0, 4096)
            with nbdkit(tmp_path, ["file", str(image)]) as second:
                await link.reconnect(RemoteAddress(second.host, second.port))
                assert link.status()["state"] == LinkState.CONNECTED.value
                assert link.description == f"127.0.0.1:{second.port}"
                assert bytes(await link.read(8192, 4096)) == data[8192:12288]


async def test_automatic_reconnect_after_origin_restart(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as first:
        port = int(first.port)
        async with open_remote_link(
            RemoteAddress(first.host, first.port), timeout=5.0, backoff_max=0.1
        ) as link:
            await link.read(0, 1)
            first.kill()

            async def restart_later() -> None:
                await trio.sleep(0.5)
                with nbdkit(tmp_path, ["file", str(image)], port=port):
                    await trio.sleep(3)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_later)
                # waits through the outage and is re-sent on the new connection
                assert bytes(await link.read(4096, 4096)) == data[4096:8192]
                nursery.cancel_scope.cancel()


async def test_a_read_does_not_wait_for_the_backoff_timer(tmp_path: Path) -> None:
    """Issue 15: after a long outage the backoff is long; a read that needs the origin asks for
    an attempt right then, so an origin back at the same address serves it at once."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as first:
        port = int(first.port)
        async with open_remote_link(
            RemoteAddress(first.host, first.port), timeout=0.3, backoff_max=60.0
        ) as link:
            await link.read(0, 1)
            first.kill()
            with trio.fail_after(10):
                while link.state is not LinkState.FAILED:
                    await trio.sleep(0.05)
            with pytest.raises(OSError):  # its own attempt failed: EIO, not a wait
                await link.read(0, 4096)
            await trio.sleep(2)  # the backoff has grown past what any test would wait
            with nbdkit(tmp_path, ["file", str(image)], port=port):
                with trio.fail_after(0.3 + 1.0):
                    assert bytes(await link.read(4096, 4096)) == data[4096:8192]
                assert link.status()["state"] == LinkState.CONNECTED.value


async def test_reconnect_refuses_another_size(tmp_path: Path) -> None:
    with nbdkit(tmp_path, ["memory", "1M"]) as first, nbdkit(tmp_path, ["memory", "2M"]) as other:
        async with open_remote_link(RemoteAddress(first.host, first.port)) as link:
            with pytest.raises(SizeMismatchError):
                await link.reconnect(RemoteAddress(other.host, other.port))
            assert link.description == f"127.0.0.1:{first.port}"
            assert bytes(await link.read(0, 10)) == bytes(10)


async def wait_for(condition: Callable[[], object], seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


async def test_a_started_read_is_sent_and_answered_before_anyone_waits(tmp_path: Path) -> None:
    """``start_read`` puts the request on the wire itself, and the reply reaches
    ``when_whole`` from the read loop: no task of the caller runs in between."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)], log=True) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            sent = link.start_read(8192, 12288)  # no await before or after: nothing else ran
            assert sent is not None
            whole: list[bytes] = []
            sent.when_whole(lambda buffer: whole.append(bytes(buffer)))
            await wait_for(lambda: whole)
            assert origin.reads() == [(8192, 12288)] and whole == [data[8192:20480]]
            assert bytes(await link.finish_read(sent)) == data[8192:20480]
            assert link.status()["requests"] == 1
            assert link.start_read(0, link.max_payload + 1) is None  # one request cannot


async def test_a_started_read_fails_with_the_origins_error(tmp_path: Path) -> None:
    trigger = tmp_path / "fail-now"
    with nbdkit(
        tmp_path,
        ["memory", "1M", "error=EIO", "error-pread-rate=1", f"error-pread-file={trigger}"],
        filters=("error",),
    ) as origin:
        async with open_remote_link(RemoteAddress(origin.host, origin.port)) as link:
            trigger.touch()
            sent = link.start_read(0, 4096)
            assert sent is not None
            whole: list[bytearray] = []
            sent.when_whole(whole.append)
            with pytest.raises(OSError) as info:
                await link.finish_read(sent)
            assert info.value.errno == errno.EIO and not whole


async def test_a_started_read_times_out_then_none_start_while_down(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        async with open_remote_link(
            RemoteAddress(origin.host, origin.port), timeout=1.0, backoff_max=0.2
        ) as link:
            await link.read(0, 1)
            origin.stop()  # no answer
            sent = link.start_read(4096, 4096)
            assert sent is not None
            start = trio.current_time()
            with pytest.raises(OSError) as info:
                await link.finish_read(sent)
            assert info.value.errno == errno.EIO
            assert 0.9 < trio.current_time() - start < 2.0
            origin.kill()
            await wait_for(lambda: link.state is not LinkState.CONNECTED)
            assert link.start_read(4096, 4096) is None  # no connection: the caller uses read


async def test_a_started_read_whose_connection_dies_is_asked_again(tmp_path: Path) -> None:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as first:
        port = int(first.port)
        async with open_remote_link(
            RemoteAddress(first.host, first.port), timeout=5.0, backoff_max=0.1
        ) as link:
            await link.read(0, 1)
            first.stop()
            sent = link.start_read(4096, 4096)
            assert sent is not None
            whole: list[bytearray] = []
            sent.when_whole(whole.append)
            first.kill()  # the request dies with its connection

            async def restart_later() -> None:
                await trio.sleep(0.3)
                with nbdkit(tmp_path, ["file", str(image)], port=port):
                    await trio.sleep(3)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_later)
                assert bytes(await link.finish_read(sent)) == data[4096:8192]
                nursery.cancel_scope.cancel()
            assert not whole  # asked again by ``read``: the early callback is not told


async def test_a_started_read_keeps_one_deadline_across_a_lost_connection(tmp_path: Path) -> None:
    """Asked again after its connection died, it still fails ``timeout`` after it was sent,
    not a whole ``timeout`` later (docs/faults.md: a request never waits longer in total)."""
    image = tmp_path / "origin.img"
    random_image(image, SIZE)
    with nbdkit(tmp_path, ["file", str(image)]) as origin:
        async with open_remote_link(
            RemoteAddress(origin.host, origin.port), timeout=1.5, backoff_max=0.1
        ) as link:
            await link.read(0, 1)
            origin.stop()
            start = trio.current_time()
            sent = link.start_read(4096, 4096)
            assert sent is not None
            await trio.sleep(0.75)
            origin.kill()  # lost half-way: asked again, but nobody answers
            with pytest.raises(OSError) as info:
                await link.finish_read(sent)
            assert info.value.errno == errno.EIO
            assert 1.4 < trio.current_time() - start < 2.0
