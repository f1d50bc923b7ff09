"""The control server on a real unix socket, driven by the blocking client, over a real proxy."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.control.proxy_target import ProxyTarget, control_over_proxy
from tests.origin_servers import nbdkit, random_image
from xnbdd.control.client import CommandFailed, ControlClient
from xnbdd.control.server import bind_control_socket, serve_control

SIZE = 2 << 20


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[str, ProxyTarget, bytes]]:
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    async with control_over_proxy(tmp_path, ["file", str(image)]) as (path, target):
        yield path, target, data


def call(path: str, cmd: str, **args: Any) -> dict[str, Any]:
    with ControlClient(path) as client:
        return client.call(cmd, **args)


async def test_socket_is_private_and_removed_at_exit(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, None)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


async def test_query_cache_all_switch(control: tuple[str, ProxyTarget, bytes]) -> None:
    path, target, data = control
    status = await trio.to_thread.run_sync(call, path, "query")
    assert status["cached_blocks"] == 0 and status["total_blocks"] == SIZE // 4096
    with pytest.raises(CommandFailed, match="incomplete cache"):
        await trio.to_thread.run_sync(call, path, "switch")
    events: list[dict[str, object]] = []

    def cache_all() -> dict[str, object]:
        with ControlClient(path) as client:
            return client.call("cache-all", events.append, blocks_per_request=4, progress=True)

    result = await trio.to_thread.run_sync(cache_all)
    assert result == {"cached_blocks": 512, "total_blocks": 512}
    assert all(e["event"] == "progress" for e in events)
    assert await target.proxy.read(0, SIZE) == data
    assert (await trio.to_thread.run_sync(call, path, "switch"))["message"].startswith("switched")


async def test_bad_requests_keep_the_connection(control: tuple[str, ProxyTarget, bytes]) -> None:
    path, _target, _data = control

    def session() -> list[bytes]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b"garbage\n" + b'{"v":1,"cmd":"nope"}\n' + b'{"v":1,"cmd":"snapshot"}\n')
            sock.sendall(b'{"v":1,"cmd":"query"}\n')
            out = b""
            while out.count(b"\n") < 4:
                out += sock.recv(65536)
            return out.splitlines()

    lines = await trio.to_thread.run_sync(session)
    assert [b'"ok":false' in line for line in lines] == [True, True, True, False]
    assert b"unknown command" in lines[1] and b"target mode only" in lines[2]


async def test_reconnect_reports_the_new_origin(
    control: tuple[str, ProxyTarget, bytes], tmp_path: Path
) -> None:
    path, target, data = control
    with nbdkit(tmp_path, ["file", str(tmp_path / "origin.img")]) as second:
        status = await trio.to_thread.run_sync(
            lambda: call(path, "reconnect", host="127.0.0.1", port=second.port, exportname=None)
        )
        assert status["remote"] == f"127.0.0.1:{second.port}"
        with (
            nbdkit(tmp_path, ["memory", "1M"]) as wrong,
            pytest.raises(CommandFailed, match="expected 2097152"),
        ):
            await trio.to_thread.run_sync(
                lambda: call(path, "reconnect", host="127.0.0.1", port=wrong.port)
            )
        assert await target.proxy.read(0, 4096) == data[:4096]


async def test_stale_socket_replaced_live_socket_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    live = bind_control_socket(path)
    try:
        with pytest.raises(FileExistsError, match="in use"):
            bind_control_socket(path)
    finally:
        live.close()
    Path(tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        bind_control_socket(str(tmp_path / "file"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
async def test_other_users_are_refused(control: tuple[str, ProxyTarget, bytes]) -> None:
    _path, target, _data = control
    # pytest's tmp_path is not traversable by others; use a world-readable directory
    directory = tempfile.mkdtemp(prefix="xnbdd-ctl-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "ctl")
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5);"
        "s.connect(sys.argv[1]); print(s.recv(4096).decode())"
    )
    argv = ["/usr/bin/python3", "-c", probe, path]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, target)
            # the file mode alone keeps "nobody" out ...
            denied = await trio.run_process(
                argv, user=65534, capture_stdout=True, capture_stderr=True, check=False
            )
            assert denied.returncode != 0 and b"PermissionError" in denied.stderr
            # ... and SO_PEERCRED does even when the mode is loosened
            os.chmod(path, 0o666)
            refused = await trio.run_process(argv, user=65534, capture_stdout=True, check=False)
            assert b"permission denied" in refused.stdout
            assert b"cached_blocks" not in refused.stdout
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory)
