"""Control commands mapped onto what the daemon offers (``ControlTarget``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from .protocol import ControlError, Request, event

ProgressSink = Callable[[int, int], None]  # (cached blocks, total blocks)


class ControlTarget(Protocol):
    """What the server offers the control socket (operations.Operations). Methods raise ``OSError``,
    ``ValueError`` or ``RuntimeError`` with a message meant for the operator."""

    def query(self) -> dict[str, Any]:
        """Status: at least size, mode; in proxy mode cache_path, bitmap_path, remote,
        remote_state, cached_blocks, total_blocks, queue/buffer usage and limits, pid."""
        ...

    async def cache_all(self, blocks_per_request: int, progress: ProgressSink) -> None:
        """Fetch every uncached block (proxy mode); returns when the cache is complete, raises
        Restarting when a restart cut it."""
        ...

    async def switch(self, force: bool) -> str:
        """Switch proxy -> target; refuse an incomplete cache unless ``force``. Returns a
        message; returns only once target mode is serving (docs/decisions.md D26)."""
        ...

    async def reconnect(self, host: str, port: str, exportname: str | None) -> None:
        """Move the proxy to another origin of the same size."""
        ...

    async def snapshot(self) -> str:
        """Take a snapshot (target modes); returns its path."""
        ...


Emit = Callable[[bytes], Awaitable[None]]


class Restarting(RuntimeError):
    """A long command was cut because the server is restarting with its clients handed over
    (docs/handover.md): the client may connect again and repeat it."""


PROGRESS_INTERVAL = 0.2  # seconds between progress events


async def handle(target: ControlTarget, request: Request, emit: Emit) -> dict[str, Any]:
    """Run one request and return what goes into ``{"ok": true, "result": ...}``. Operator
    errors are raised as ControlError, OSError, ValueError or RuntimeError."""
    args = request.args
    if request.cmd == "query":
        return target.query()
    if request.cmd == "cache-all":
        await _cache_all(
            target, args.get("blocks_per_request", 31), args.get("progress", True), emit
        )
        query = target.query()
        return {k: query[k] for k in ("cached_blocks", "total_blocks") if k in query}
    if request.cmd == "switch":
        return {"message": await target.switch(bool(args.get("force", False)))}
    if request.cmd == "reconnect":
        await target.reconnect(str(args["host"]), str(args["port"]), args.get("exportname"))
        return target.query()
    if request.cmd == "snapshot":
        return {"path": await target.snapshot()}
    raise ControlError(f"unknown command {request.cmd!r}")


async def _cache_all(target: ControlTarget, blocks: int, progress: bool, emit: Emit) -> None:
    """Run cache-all; meanwhile send the latest progress at most every PROGRESS_INTERVAL."""
    if blocks < 1:
        raise ControlError("blocks_per_request must be at least 1")
    latest: list[tuple[int, int]] = []
    done = trio.Event()

    def record(cached: int, total: int) -> None:
        latest[:] = [(cached, total)]

    async def reporter() -> None:
        while not done.is_set():
            with trio.move_on_after(PROGRESS_INTERVAL):
                await done.wait()
            if latest and progress:
                (cached, total), latest[:] = latest[0], []
                await emit(event("progress", cached=cached, total=total))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        try:
            await target.cache_all(blocks, record)
        except Restarting:
            await emit(event("restarting"))  # then the error answer: connect again, repeat
            raise
        finally:
            done.set()
