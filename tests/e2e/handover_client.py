"""The checksumming libnbd client of the restart tests (verify_client.py), driven from a test.

It runs with the system's python3 (Debian's python3-libnbd is built for it) in a container's
network namespace; its output lines arrive in a queue, so a test waits for progress, not time.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.systemd_fixtures import Container

SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT = Path(__file__).with_name("verify_client.py")


def has_libnbd() -> bool:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
    return probe.returncode == 0


class Client:
    """verify_client.py in the container's network namespace; its lines arrive in a queue."""

    def __init__(self, box: Container, uri: str, *args: str) -> None:
        self.proc = box.popen_in_net(SYSTEM_PYTHON, str(CLIENT), uri, *args)
        self.lines: queue.Queue[str] = queue.Queue()
        self.rounds = 0
        self.result: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._next(60) == "connected", self.stderr()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # end of output

    def _next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"client silent for {timeout} s") from None
        if line.startswith("{"):
            self.result = json.loads(line)
        elif line.startswith("progress "):
            self.rounds = int(line.split()[1])
        return line

    def progress(self, more: int = 1, timeout: float = 90) -> None:
        """Wait until the client has finished ``more`` progress steps from now."""
        target = self.rounds + more
        deadline = time.monotonic() + timeout
        while self.rounds < target:
            line = self._next(max(deadline - time.monotonic(), 0.1))
            if not line or self.result is not None:
                raise AssertionError(f"client ended: {self.result} {self.stderr()}")

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        """The client's summary (ask it to quit first, or have the server end it)."""
        deadline = time.monotonic() + timeout
        while self.result is None:
            line = self._next(max(deadline - time.monotonic(), 0.1))
            if not line and self.result is None:
                raise AssertionError(f"client died without a summary: {self.stderr()}")
        self.proc.wait(timeout)
        self._close_pipes()
        return self.result

    def quit(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        return self.finish()

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        """The process has ended: its output reaches its end, then every pipe closes."""
        self._reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
