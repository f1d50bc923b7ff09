"""The storage interface every backend implements.

Backends know nothing of NBD: they take byte ranges that the protocol layer has already checked
against ``size`` (offset + length <= size, length > 0) and raise ``OSError`` on failure.
``dispatch`` maps the errno to the wire. Methods are async so that a backend may wait on a thread
or on a remote server; a backend that can finish without waiting simply never suspends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

MAX_EXTENTS = 4096  # block_status answers a prefix beyond this many extents


@dataclass(frozen=True)
class Capabilities:
    """What a backend can truthfully promise; the transmission flags are derived from this."""

    readonly: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = True  # zero() with fast=True may succeed (else always ENOTSUP)
    cache: bool = True
    multi_conn: bool = True  # every connection of the export shares one data path
    # Another process opening the same image sees this one's writes (a file: yes; a private
    # cow overlay or a proxy's cache: no). Decides multi-conn when each connection is its own
    # process (--inetd, Accept=yes).
    shared_by_processes: bool = True
    block_status: bool = True


@dataclass(frozen=True)
class Extent:
    """A run of bytes with base:allocation state (``hole``: unallocated, ``zero``: reads as 0)."""

    length: int
    hole: bool = False
    zero: bool = False


@dataclass
class FileRange:
    """Data a reply can send straight from an open file (sendfile: no copy through Python).
    Backends offer it only where reading cannot block and cannot fail half-way silently."""

    fd: int
    offset: int
    length: int


class Backend(Protocol):
    """Storage behind one export. All ranges are validated by the caller."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes."""
        ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard a range; later reads return old data or zeros."""
        ...

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        """Make a range read as zeros. ``may_trim``: a hole is fine (no NO_HOLE flag).
        ``fast``: raise OSError(ENOTSUP) without changing anything unless zeroing is cheap."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (proxy: fetch into the local cache). Contents never change."""
        ...

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """At least one extent, covering a prefix of (or exactly) the range, lengths > 0."""
        ...

    async def close(self) -> None:
        """Flush and release resources."""
        ...


class ChangeGuard(Protocol):
    """Told before a backend changes what clients see (a snapshot being copied, snapshot.py).
    ``covered`` never waits and may be asked from any thread; ``preserve`` may block."""

    def covered(self, offset: int, length: int) -> bool:
        """True: changing the range needs no ``preserve`` first."""
        ...

    def preserve(self, offset: int, length: int) -> None:
        """Blocking: keep what the range holds now, before it changes."""
        ...


@runtime_checkable
class InlineIO(Protocol):
    """The synchronous side a backend may offer: I/O that needs no waiting (the page cache, a
    memory file system, blocks already in a local cache). A connection's data-plane thread calls
    it while the event loop may be running the backend's async methods, so an implementation
    must be safe for that; what it cannot do at once it declines, and the request takes the
    async path. Declining costs nothing: nothing has changed."""

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        """Exactly ``length`` bytes (or a file range to send them from), or None."""
        ...

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` (not durably); False: nothing was promised, use ``write``."""
        ...

    def is_hole(self, offset: int, length: int) -> bool:
        """True only if the range certainly reads as zeros and saying so needs no waiting."""
        ...


TryRead = Callable[[int, int], bytes | bytearray | FileRange | None]  # InlineIO's, bound
TryWrite = Callable[[int, bytes | bytearray | memoryview], bool]


class PendingRead(Protocol):
    """A read whose slow part is under way (``StartsReads.start_read``)."""

    def when_data(self, answer: Callable[[memoryview], None]) -> None:
        """``answer(data)`` on the event loop as soon as the data is there, before ``result``
        returns (the backend may still be keeping a copy); never if it fails or is retried."""
        ...

    async def result(self) -> memoryview:
        """The data, once the backend is done with the read; OSError as ``Backend.read``."""
        ...


@runtime_checkable
class StartsReads(Protocol):
    """A backend that starts a slow read on the event loop without waiting, so its slow part
    (the proxy's fetch from the origin) leaves before any task runs for the request."""

    def start_read(self, offset: int, length: int) -> PendingRead | None:
        """Started, or None: use ``read``. On the event loop's thread; never waits."""
        ...


class PipedPayload(Protocol):
    """A WRITE payload that never passed through Python (payload_pipe.PayloadPipe)."""

    def write_to(self, fd: int, offset: int) -> None:
        """Write it all at ``offset`` of ``fd`` (the page cache's copy is the only one)."""
        ...


@runtime_checkable
class PipeSink(Protocol):
    """A backend whose file can take a large WRITE payload straight from a pipe; called, like
    ``InlineIO``, from a connection's data-plane thread."""

    @property
    def takes_pipes(self) -> bool:
        """Whether ``try_write_piped`` can write at all (else no payload goes into a pipe)."""
        ...

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        """Write the payload (not durably) without waiting; False: nothing was promised and
        the payload is still whole (it takes the buffer path)."""
        ...


class CacheStore(Backend, InlineIO, PipeSink, Protocol):
    """Where a proxy keeps the origin's blocks: a local file (FileBackend) or an RBD image
    (RbdBackend); ``release`` closes it without a flush."""

    def release(self) -> None: ...
