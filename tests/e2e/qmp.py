"""A minimal QMP client for tests: commands and events over a qemu monitor's unix socket.

QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then each command is answered
by a {"return": ...} or {"error": ...} object while {"event": ...} objects may arrive at any
time in between; they are kept in order for `wait_event`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no QMP monitor at {path} after {timeout} s") from None
                time.sleep(0.05)
        self.timeout = timeout
        self.buffer = bytearray()
        self.events: list[dict[str, Any]] = []
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float) -> dict[str, Any]:
        """The next message; TimeoutError (nothing lost) when none is complete in time."""
        deadline = time.monotonic() + timeout
        while (end := self.buffer.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no QMP message in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("the QMP monitor closed the connection")
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command; its "return" value, or QmpError with qemu's message."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.settimeout(self.timeout)
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read(self.timeout)
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(f"{command}: {message['error'].get('desc', message['error'])}")
            elif "return" in message:
                return message["return"]

    def wait_event(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        """The first event called `name` (taken out of `events`), waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [e["event"] for e in self.events]
                raise TimeoutError(f"no {name} event within {timeout} s (got {seen})")
            try:
                self.events.append(self._read(remaining))
            except TimeoutError:
                continue
