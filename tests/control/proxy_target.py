"""A ControlTarget over a real ProxyBackend, standing in for the daemon in control tests."""

from __future__ import annotations

import os
from typing import Any

from xnbdd.backends.proxy import ProxyBackend
from xnbdd.control.handlers import ProgressSink
from xnbdd.remote import RemoteAddress


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
