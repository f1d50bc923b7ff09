"""A ControlTarget over a real ProxyBackend, standing in for the daemon in control tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tests.origin_servers import nbdkit
from xnbdd.backends.proxy import ProxyBackend, open_proxy_backend
from xnbdd.control.handlers import ProgressSink
from xnbdd.control.server import serve_control
from xnbdd.dial import RemoteAddress


class ProxyTarget:
    def __init__(self, proxy: ProxyBackend) -> None:
        self.proxy = proxy
        self.switched = False

    def query(self) -> dict[str, Any]:
        status = self.proxy.status().as_dict()
        status.update(mode="target" if self.switched else "proxy", pid=os.getpid())
        status.update(queue_used=0, queue_limit=0, buffer_used=0, buffer_limit=0)
        return status

    async def cache_all(self, blocks_per_request: int, progress: ProgressSink) -> None:
        await self.proxy.cache_all(blocks_per_request, progress)

    async def switch(self, force: bool) -> str:
        if not force and not self.proxy.is_complete():
            raise RuntimeError("refusing to switch to target mode with incomplete cache")
        backend = await self.proxy.switch_to_target()
        await backend.close()
        self.switched = True
        return "switched to target mode"

    async def reconnect(self, host: str, port: str, exportname: str | None) -> None:
        await self.proxy.reconnect(RemoteAddress(host, port, exportname))

    async def snapshot(self) -> str:
        raise RuntimeError("snapshot works in target mode only")


@asynccontextmanager
async def control_over_proxy(
    tmp_path: Path, origin_args: list[str], filters: Sequence[str] = ()
) -> AsyncIterator[tuple[str, ProxyTarget]]:
    """An nbdkit origin, a real proxy in front of it, and a control server for that proxy;
    yields the control socket path and the target."""
    path = str(tmp_path / "ctl")
    with nbdkit(tmp_path, origin_args, filters=tuple(filters)) as origin:
        async with (
            open_proxy_backend(
                RemoteAddress(origin.host, origin.port), str(tmp_path / "c"), str(tmp_path / "b")
            ) as proxy,
            trio.open_nursery() as nursery,
        ):
            target = ProxyTarget(proxy)
            await nursery.start(serve_control, path, target)
            yield path, target
            nursery.cancel_scope.cancel()
