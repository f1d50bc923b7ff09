"""The proxy heals at once (issue 15): after its origin died, a read that needs the origin tries
to reach it right then instead of failing until a backoff timer fires. Real parts: nbdkit as the
origin, killed with SIGKILL and started again on the same port, python3-libnbd as the client,
xnbd-bgctl --query for the link state, the daemon's log for the down/up lines."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from tests.e2e.test_proxy_e2e import BLOCK, ProxyFiles, bgctl, connect, query
from tests.libnbd import import_nbd
from tests.origin_servers import free_port, nbdkit, random_image
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

SIZE = 4 << 20
TIMEOUT = 1.0


def wait_for_state(ctl: Path, state: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while query(ctl)["remote_state"] != state:
        assert time.monotonic() < deadline, f"the link never became {state}"
        time.sleep(0.05)


def test_origin_restarted_on_the_same_port_serves_the_next_uncached_read(tmp_path: Path) -> None:
    nbd = import_nbd()
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    files = ProxyFiles.under(tmp_path)
    port = free_port()
    first = nbdkit(tmp_path, ["file", str(image)], port=port)
    origin = first.__enter__()
    try:
        with running_server(
            *files.args(origin.host, origin.port),
            "--remote-timeout",
            str(TIMEOUT),
            tmp_path=tmp_path,
        ) as proxy:
            handle = connect(proxy.uri)
            assert handle.pread(BLOCK, 0) == data[:BLOCK]  # block 0 is cached now
            origin.kill()
            first.__exit__(None, None, None)
            # down for longer than the timeout: uncached reads fail (after trying), cached
            # ones are served, and the state says so everywhere
            wait_for_state(files.ctl, "failed")
            with pytest.raises(nbd.Error) as failed:
                handle.pread(BLOCK, 100 * BLOCK)
            assert failed.value.errnum == errno.EIO
            assert handle.pread(BLOCK, 0) == data[:BLOCK]
            text = bgctl("--query", str(files.ctl)).stdout
            assert "failed" in text, text
            time.sleep(4)  # the reconnect backoff has grown to seconds meanwhile
            with nbdkit(tmp_path, ["file", str(image)], port=port):
                began = time.monotonic()
                assert handle.pread(BLOCK, 200 * BLOCK) == data[200 * BLOCK : 201 * BLOCK]
                took = time.monotonic() - began
                assert took < TIMEOUT, f"the read waited {took:.2f}s for a timer"
                assert query(files.ctl)["remote_state"] == "connected"
                handle.shutdown()
            log = proxy.log()
            assert f"origin 127.0.0.1:{port} is down" in log, log
            assert f"origin 127.0.0.1:{port} is back" in log, log
    finally:
        first.__exit__(None, None, None)
