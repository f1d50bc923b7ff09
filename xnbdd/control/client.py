"""Blocking client of the control socket (used by xnbd-bgctl; no trio needed)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from .protocol import ControlError, LineBuffer, decode, request

TYPE_CHECKING = False  # not typing's: importing typing costs xnbd-bgctl's start 2 ms
if TYPE_CHECKING:
    from typing import Any


class CommandFailed(Exception):
    """The daemon answered ``{"ok": false}``; the text is its reason."""


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock = self._connect()
        self._lines = LineBuffer()
        self._ready: list[bytes] = []

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def reopen(self) -> None:
        """Connect again (after the daemon restarted); OSError while nobody listens."""
        sock = self._connect()
        self._sock.close()
        self._sock = sock
        self._lines = LineBuffer()
        self._ready = []

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def set_timeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def _next_message(self) -> dict[str, Any]:
        while not self._ready:
            data = self._sock.recv(65536)
            if not data:
                raise ControlError("the daemon closed the control connection")
            self._ready += self._lines.feed(data)
        return decode(self._ready.pop(0))

    def call(
        self, cmd: str, on_event: Callable[[dict[str, Any]], None] | None = None, **args: Any
    ) -> dict[str, Any]:
        """Send one request; events go to ``on_event``; returns the result or raises
        CommandFailed."""
        self._sock.sendall(request(cmd, **args))
        while True:
            message = self._next_message()
            if "event" in message:
                if on_event is not None:
                    on_event(message)
                continue
            if message.get("ok") is True:
                result = message.get("result", {})
                return result if isinstance(result, dict) else {"result": result}
            raise CommandFailed(str(message.get("error", "unknown error")))
