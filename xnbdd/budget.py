"""How much the daemon may hold for requests in flight: the limits, and the shared byte budget.

Two bounds, both soft by one request so that a request larger than a limit still runs, alone:
- per connection, ``--max-queue-size`` requests (the client's queue depth);
- for the whole daemon, ``--max-buf-size`` bytes of request data (WRITE payloads being received
  or waiting for the backend, READ data waiting to be sent), as xNBD's proxy meant it: a few
  hundred connections cannot hold more than this between them.

A connection that cannot get what its next request costs stops reading its socket (the client's
TCP window closes) and is woken when another connection gives bytes back. Data-plane threads and
the event loop both use the budget, so it is guarded by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_REQUESTS = 256
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class Limits:
    """``--max-queue-size`` / ``--max-buf-size`` (0 keeps the default) and the timeouts."""

    max_requests: int = DEFAULT_MAX_REQUESTS  # per connection
    max_bytes: int = DEFAULT_MAX_BYTES  # the whole daemon
    handshake_timeout: float = 30.0
    shutdown_grace: float = 5.0


class ByteBudget:
    """Bytes of request data held by the whole daemon. ``try_take`` never waits: a caller that
    is refused registers a wake-up callback and tries again when it is called."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0
        self.requests = 0  # requests in flight on every connection, for STATUS and query
        self._lock = threading.Lock()
        self._waiters: dict[int, Callable[[], None]] = {}

    def try_take(self, cost: int, key: int, wake: Callable[[], None]) -> bool:
        """Take ``cost`` bytes (and count one request); False, with ``wake`` registered under
        ``key``, when they are not available now. Nothing held lets any one request through."""
        with self._lock:
            if cost and self.used and self.used + cost > self.limits.max_bytes:
                self._waiters[key] = wake
                return False
            self.used += cost
            self.requests += 1
            return True

    def give_back(self, cost: int, count: int) -> None:
        """Return the bytes of ``count`` finished requests; wakes every waiting connection."""
        with self._lock:
            self.used -= cost
            self.requests -= count
            if not (cost and self._waiters):
                return
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for wake in waiters:
            wake()

    def forget(self, key: int) -> None:
        """A connection that ends stops waiting."""
        with self._lock:
            self._waiters.pop(key, None)
