"""How much the daemon may hold for requests in flight: the limits, and the shared byte budget.

- ``--max-queue-size``: requests in flight per connection (the client's queue depth).
- ``--max-buf-size``: bytes of request data the whole daemon holds (WRITE payloads received and
  not yet written, READ data not yet sent), as xNBD's proxy meant it; a few hundred connections
  cannot hold more than this between them. One connection holds at most a quarter of it (but
  always one request of the maximum payload), so a client that never reads its replies cannot
  take it all. A request larger than what is free runs once nothing else is held.

A large WRITE is charged when its payload starts to arrive, not when its header does: a header
alone costs nothing. A connection that cannot have what its next request costs stops reading its
socket (the client's TCP window closes). Waiting connections are served first come, first
served, so a large request is not starved by a stream of small ones; the first in line is woken
when bytes come back. Data-plane threads and the event loop share the budget, behind a lock.

A data-plane thread takes bytes ahead (``take_ahead``) while nobody is in line and the daemon has
room: its next small requests draw on them without the lock, replies sent refill them, and it
gives them all back when it has slept a few milliseconds (dataplane.SETTLE_AFTER_MS) or, when a
connection is in line, at its next send or sleep. So an idle connection holds nothing ahead for
long and a connection in line waits at most a batch (or those milliseconds) for them. ``used``
counts them; a busy thread tells ``requests`` its changes when it gives them back.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .proto.consts import MAX_ACCEPTED_PAYLOAD

DEFAULT_MAX_REQUESTS = 256
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class Limits:
    """``--max-queue-size`` / ``--max-buf-size`` (0 keeps the default) and the timeouts."""

    max_requests: int = DEFAULT_MAX_REQUESTS  # per connection
    max_bytes: int = DEFAULT_MAX_BYTES  # the whole daemon
    handshake_timeout: float = 30.0
    shutdown_grace: float = 5.0

    @property
    def max_bytes_per_connection(self) -> int:
        return max(self.max_bytes // 4, MAX_ACCEPTED_PAYLOAD)


class Grant(enum.Enum):
    TAKEN = "taken"
    OWN_SHARE = "the connection holds its share: it must send replies first"
    QUEUED = "queued for the daemon's bytes: the waker is called when it is this one's turn"


class ByteBudget:
    """Bytes of request data held by the whole daemon, and requests in flight (for STATUS)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._waiters: dict[int, Callable[[], None]] = {}  # in arrival order

    def take(self, cost: int, held: int, key: int, wake: Callable[[], None]) -> Grant:
        """Take ``cost`` bytes for a connection that holds ``held``; never waits."""
        if not cost:
            return Grant.TAKEN
        if held and held + cost > self.limits.max_bytes_per_connection:
            return Grant.OWN_SHARE
        limit = self.limits.max_bytes
        with self._lock:
            if not self._waiters:  # nobody in line: the common case
                if self.used and self.used + cost > limit:
                    self._waiters[key] = wake
                    return Grant.QUEUED
                self.used += cost
                return Grant.TAKEN
            first = next(iter(self._waiters), key)
            if not (first == key and (not self.used or self.used + cost <= self.limits.max_bytes)):
                self._waiters.setdefault(key, wake)
                return Grant.QUEUED
            self.used += cost
            self._waiters.pop(key, None)
            # the next in line may fit in what is left; it was not woken while we were first
            following = next(iter(self._waiters.values()), None)
        if following is not None:
            following()
        return Grant.TAKEN

    def take_ahead(
        self, cost: int, spare: int, held: int, key: int, wake: Callable[[], None]
    ) -> tuple[Grant, int]:
        """``take``, and when it is granted and nobody is in line, up to ``spare`` bytes more
        (at most half of what the daemon has free after ``cost``); returns them with the
        grant."""
        if held and held + cost > self.limits.max_bytes_per_connection:
            return Grant.OWN_SHARE, 0
        limit = self.limits.max_bytes
        with self._lock:
            if not self._waiters:
                used = self.used
                if used and used + cost > limit:
                    self._waiters[key] = wake
                    return Grant.QUEUED, 0
                extra = (limit - used - cost) >> 1
                if extra > spare:
                    extra = spare
                elif extra < 0:
                    extra = 0
                self.used = used + cost + extra
                return Grant.TAKEN, extra
        return self.take(cost, held, key, wake), 0  # the line decides, nothing ahead

    def count(self, requests: int) -> None:
        with self._lock:
            self.requests += requests

    def give_back(self, cost: int, requests: int) -> None:
        """Return the bytes of ``requests`` finished requests; wakes the first in line."""
        with self._lock:
            self.used -= cost
            self.requests -= requests
            wake = next(iter(self._waiters.values()), None) if cost else None
        if wake is not None:
            wake()

    @property
    def waiting(self) -> int:
        """Connections in line for bytes."""
        return len(self._waiters)

    @property
    def line(self) -> dict[int, Callable[[], None]]:
        """The line itself: a data-plane thread looks at it without the lock (a hint, checked
        again under the lock where it matters) to know when to give back its bytes ahead."""
        return self._waiters

    def forget(self, key: int) -> None:
        """A connection that ends leaves the line (and the next in line is woken)."""
        with self._lock:
            if self._waiters.pop(key, None) is None:
                return
            wake = next(iter(self._waiters.values()), None)
        if wake is not None:
            wake()
