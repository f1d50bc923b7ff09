"""xnbd-bgctl as a separate process against a control server over a real proxy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.control.proxy_target import ProxyTarget, control_over_proxy
from tests.origin_servers import nbdkit, random_image
from xnbdd.cli.bgctl import format_query
from xnbdd.control.protocol import error, event, ok

SIZE = 8 << 20
ROOT = str(Path(__file__).resolve().parents[2])


async def bgctl(*args: str, stderr: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run xnbd-bgctl; stderr captured unless a file descriptor (a terminal) is given."""
    command = [sys.executable, "-m", "xnbdd.cli.bgctl", *args]
    env = {**os.environ, "PYTHONPATH": ROOT}
    if stderr is None:
        return await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    return await trio.run_process(command, capture_stdout=True, stderr=stderr, check=False, env=env)


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[tuple[str, ProxyTarget, Path]]:
    image = tmp_path / "origin.img"
    random_image(image, SIZE)
    origin = ["file", str(image), "rdelay=2ms"]
    async with control_over_proxy(tmp_path, origin, filters=("delay",)) as (path, target):
        yield path, target, image


def test_query_format_matches_the_original() -> None:
    text = format_query(
        {
            "cache_path": "/c",
            "bitmap_path": "/b",
            "size": 67108864,
            "remote": "h:8520",
            "cached_blocks": 272,
            "total_blocks": 16384,
            "buffer_used": 0,
            "buffer_limit": 0,
            "queue_used": 3,
            "queue_limit": 4,
        }
    )
    assert text.splitlines() == [
        "/c (/b): disksize 67108864",
        "forwarded to h:8520",
        "cached blocks 272 / 16384 (1.6%)",
        "internal buffer usage: 0 bytes / 0 bytes (0.0%)",
        "pending request count: 3 / 4 (75.0%)",
    ]
    assert "(99.9%)" in format_query({"cached_blocks": 16383, "total_blocks": 16384})


def test_query_format_of_a_server_in_target_mode() -> None:
    """After a switch the daemon has no cache, bitmap or origin: no "? (?)" or "0 / 0" lines."""
    text = format_query(
        {"mode": "target", "image": "/c", "size": 4096, "queue_used": 1, "queue_limit": 0}
    )
    assert text.splitlines() == [
        "target mode: /c, disksize 4096",
        "internal buffer usage: 0 bytes / 0 bytes (0.0%)",
        "pending request count: 1 / 0 (0.0%)",
    ]


async def test_query_switch_guard_cache_all_and_switch(
    ctl: tuple[str, ProxyTarget, Path],
) -> None:
    path, target, _image = ctl
    await target.proxy.read(0, 4096 * 10)
    lone = await bgctl(path)  # a lone socket means --query
    assert f"cached blocks 10 / {SIZE // 4096} (0.4%)" in lone.stdout.decode()
    as_json = json.loads((await bgctl("--json", "--query", path)).stdout)
    assert as_json["cached_blocks"] == 10 and as_json["remote_state"] == "connected"
    refused = await bgctl("--switch", path)
    assert refused.returncode == 1 and b"incomplete cache" in refused.stderr
    done = await bgctl("--progress", "--blocks-per-request", "16", "--cache-all", path)
    assert done.returncode == 0 and done.stderr == b""  # no terminal: no bar
    assert "(100.0%)" in (await bgctl("-q", path)).stdout.decode()
    switched = await bgctl("--switch", path)
    assert switched.returncode == 0 and target.switched


async def test_progress_bar_on_a_terminal(ctl: tuple[str, ProxyTarget, Path]) -> None:
    path, _target, _image = ctl
    master, slave = os.openpty()
    try:
        result = await bgctl("--progress", "--blocks-per-request", "4", "-c", path, stderr=slave)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert result.returncode == 0
    assert b"100.0% [" in shown and b"MiB/s" in shown and b"left" in shown


async def test_reconnect_and_force_switch(
    ctl: tuple[str, ProxyTarget, Path], tmp_path: Path
) -> None:
    path, target, image = ctl
    with nbdkit(tmp_path, ["file", str(image)]) as second:
        result = await bgctl("--exportname", "", "--reconnect", path, "127.0.0.1", second.port)
        assert result.returncode == 0, result.stderr
        assert f"forwarded to 127.0.0.1:{second.port}" in result.stdout.decode()
    warned = await bgctl("--force", "--query", path)
    assert b"ignore --force" in warned.stderr
    forced = await bgctl("--force", "--switch", path)
    assert forced.returncode == 0 and b"despite an incomplete cache" in forced.stderr
    assert target.switched


async def test_snapshot_of_a_proxy_is_refused_in_one_line(
    ctl: tuple[str, ProxyTarget, Path],
) -> None:
    path, _, _ = ctl
    result = await bgctl("--snapshot", path)
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr == b"xnbd-bgctl: snapshot failed: snapshot works in target mode only\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--query", "--switch", "/x"],
        ["--reconnect", "/x", "host"],
        ["--query", "/x", "extra"],
        ["--blocks-per-request", "0", "--cache-all", "/x"],
        ["--bogus", "/x"],
        [],
    ],
)
async def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = await bgctl(*args)
    assert result.returncode == 1
    assert len(result.stderr.decode().strip().splitlines()) == 1


async def test_unreachable_socket(tmp_path: Path) -> None:
    result = await bgctl("--query", str(tmp_path / "nothing"))
    assert result.returncode == 2 and b"cannot connect" in result.stderr


def test_cache_all_waits_out_the_stopping_server_after_a_restart(tmp_path: Path) -> None:
    """A restart cuts cache-all with the "restarting" event. The stopping process's control
    socket may still take bgctl's next connection and then close it unanswered (it is going
    away): that is "not back yet", not an error; the next process answers and bgctl succeeds."""
    path = str(tmp_path / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    requests: list[dict[str, object]] = []

    def play() -> None:
        with listener:
            for scene in ("restart", "stopping", "next"):
                conn, _ = listener.accept()
                with conn:
                    if scene == "stopping":
                        continue  # taken, never answered
                    requests.append(json.loads(conn.makefile("rb").readline()))
                    if scene == "restart":
                        conn.sendall(event("restarting") + error("the server is restarting"))
                    else:
                        conn.sendall(ok({"cached_blocks": 8, "total_blocks": 8}))

    server = threading.Thread(target=play)
    server.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xnbdd.cli.bgctl", "--cache-all", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert [r["cmd"] for r in requests] == ["cache-all", "cache-all"]
    assert "the server restarted; cache-all goes on" in done.stderr


def test_start_imports_only_what_it_needs(tmp_path: Path) -> None:
    """cache-all's time counts xnbd-bgctl's start: the modules that cost it most (typing,
    dataclasses, shutil through argparse's help formatter, trio) stay out of a run."""
    script = (
        "import sys\n"
        "from xnbdd.cli.bgctl import main\n"
        f"code = main(['--cache-all', {str(tmp_path / 'none.ctl')!r}])\n"
        "print(' '.join(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env)
    assert run.returncode == 2, run.stderr  # nobody listens there
    loaded = set(run.stdout.decode().split())
    assert "xnbdd.control.client" in loaded
    assert not loaded & {"typing", "dataclasses", "shutil", "trio"}
