"""A Ceph RBD image as the storage behind an export: ``rbd:POOL/IMAGE[@SNAP]`` (docs/rbd.md).

librbd comes from Debian's python3-rbd and python3-rados (there is no PyPI binding), imported
from the system's dist-packages; without them the daemon stops at start-up with one line.

One cluster connection, one I/O context and one open image per export, shared by every
connection: librbd is thread-safe and keeps its own queue of requests to the OSDs. Reads and
writes run librbd's synchronous calls (they release the GIL) in a pool of worker threads per
image: measured faster than librbd's asynchronous API, whose per-request completion callbacks
cost more in Python than a thread hand-off (docs/rbd.md). Flush, discard and write-zeroes use the
asynchronous API, woken through the trio token. Nothing is answered inline (every read needs the
network), so the backend's InlineIO always declines.

A snapshot (``@SNAP``) is opened read-only: clients are told, and writes get EPERM.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import trio

from xnbdd.backends.base import MAX_EXTENTS, Capabilities, Extent, FileRange, PipedPayload

log = logging.getLogger("xnbdd")
T = TypeVar("T")

PREFIX = "rbd:"
PACKAGES = "python3-rbd python3-rados"
CONNECT_TIMEOUT = 30  # seconds to reach the monitors before start-up fails
THREADS = 16  # reads and writes in flight per image (librbd's sync calls release the GIL)


def is_rbd(image: str) -> bool:
    return image.startswith(PREFIX)


@dataclass(frozen=True)
class RbdSpec:
    """``rbd:POOL/IMAGE[@SNAP]``, parsed."""

    pool: str
    image: str
    snap: str | None = None

    @classmethod
    def parse(cls, text: str) -> RbdSpec:
        """ValueError with the reason for anything but ``rbd:POOL/IMAGE[@SNAP]``."""
        rest = text.removeprefix(PREFIX)
        name, at, snap = rest.partition("@")
        pool, slash, image = name.partition("/")
        if not slash or not pool or not image or "/" in image or (at and not snap):
            raise ValueError(f"{text}: not rbd:POOL/IMAGE or rbd:POOL/IMAGE@SNAP")
        return cls(pool, image, snap or None)

    def __str__(self) -> str:
        return f"{PREFIX}{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


@dataclass(frozen=True)
class RbdCluster:
    """How to reach the cluster: ceph.conf, the client id (``admin`` for client.admin) and its
    keyring; None: librbd's defaults (/etc/ceph/ceph.conf, client.admin, its keyring)."""

    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None


class RbdUnavailable(OSError):
    """python3-rbd / python3-rados are not installed."""


def librbd() -> tuple[ModuleType, ModuleType]:
    """The ``rados`` and ``rbd`` modules, or RbdUnavailable saying which packages to install."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as err:
        raise RbdUnavailable(
            errno.ENOPKG,
            f"rbd: images need Ceph's Python bindings ({err.name} is missing): "
            f"apt-get install {PACKAGES}",
        ) from None


def _errno_of(err: Exception) -> int:
    code = getattr(err, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno.EIO


class RbdBackend:
    """One RBD image (or one of its snapshots, read-only), shared by every connection."""

    def __init__(self, spec: RbdSpec, cluster: Any, ioctx: Any, image: Any, readonly: bool) -> None:
        self.spec = spec
        self.path = str(spec)
        self.readonly = readonly or spec.snap is not None
        self._cluster = cluster
        self._ioctx = ioctx
        self._image = image
        self._size: int = image.size()
        self._closed = False
        self._limiter = trio.CapacityLimiter(THREADS)

    @classmethod
    def open_cache(
        cls, text: str, cluster_opts: RbdCluster, size: int, *, clear: bool
    ) -> RbdBackend:
        """A proxy's cache image of ``size`` bytes (blocking): created thin when missing, grown
        when smaller; a larger one is refused unless ``clear`` (then it is cut to size)."""
        backend = cls.open(text, cluster_opts, readonly=False, create_size=size)
        try:
            if backend.size > size and not clear:
                raise OSError(
                    errno.EINVAL,
                    f"cache {text} is {backend.size} bytes, larger than the origin's {size} "
                    "bytes (use --clear-bitmap to cut it to size and start over)",
                )
            if backend.size != size:
                backend._image.resize(size)
                backend._size = size
        except BaseException:
            backend.release()
            raise
        return backend

    @classmethod
    def open(
        cls, text: str, cluster_opts: RbdCluster, *, readonly: bool, create_size: int = 0
    ) -> RbdBackend:
        """Connect and open the image (blocking: call it from a thread); ``create_size``: create
        a missing image of that size. OSError saying what is wrong: bindings missing, cluster
        unreachable, pool or image or snapshot missing."""
        spec = RbdSpec.parse(text)
        rados, rbd = librbd()
        conf: dict[str, str] = {}
        if cluster_opts.keyring:
            conf["keyring"] = cluster_opts.keyring
        try:
            cluster = rados.Rados(
                rados_id=cluster_opts.client_id,
                conffile=cluster_opts.conf or "",  # "": the default search path
                conf=conf,
            )
        except rados.Error as err:
            raise OSError(_errno_of(err), f"{spec}: ceph configuration: {err}") from None
        try:
            try:
                cluster.connect(timeout=CONNECT_TIMEOUT)
            except rados.Error as err:
                raise OSError(_errno_of(err), f"{spec}: cannot reach the cluster: {err}") from None
            try:
                ioctx = cluster.open_ioctx(spec.pool)
            except rados.ObjectNotFound:
                raise OSError(errno.ENOENT, f"{spec}: no pool {spec.pool!r}") from None
            if create_size and spec.image not in rbd.RBD().list(ioctx):
                log.info("%s: creating the image, %d bytes", spec, create_size)
                rbd.RBD().create(ioctx, spec.image, create_size)
            try:
                image = rbd.Image(
                    ioctx, spec.image, snapshot=spec.snap, read_only=readonly or bool(spec.snap)
                )
            except rbd.ImageNotFound:
                ioctx.close()
                what = f"snapshot {spec.snap!r} of " if spec.snap else ""
                raise OSError(
                    errno.ENOENT, f"{spec}: no {what}image {spec.image!r} in pool {spec.pool!r}"
                ) from None
            except rbd.Error as err:
                ioctx.close()
                raise OSError(_errno_of(err), f"{spec}: cannot open: {err}") from None
        except BaseException:
            cluster.shutdown()
            raise
        return cls(spec, cluster, ioctx, image, readonly)

    # -- Backend protocol ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        writable = not self.readonly
        return Capabilities(
            readonly=self.readonly,
            flush=True,
            fua=writable,
            trim=writable,
            zero=writable,
            fast_zero=writable,  # zeroing is an OSD operation: no data crosses the network
            cache=True,
            multi_conn=True,  # one image handle: every connection sees every write
            block_status=True,
        )

    async def read(self, offset: int, length: int) -> bytes:
        data: bytes = await self._thread(self._image.read, offset, length)
        if len(data) != length:  # the image shrank underneath: not zeros made up
            raise OSError(errno.EIO, f"{self.path}: short read at {offset}")
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self._check_writable()
        await self._thread(self._image.write, bytes(data), offset)  # it takes bytes only
        if fua:  # librbd has no per-write FUA: a flush after it makes it durable
            await self.flush()

    async def flush(self) -> None:
        if not self.readonly:
            await self._aio(self._image.aio_flush)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check_writable()
        await self._aio(lambda cb: self._image.aio_discard(offset, length, cb))
        if fua:
            await self.flush()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        self._check_writable()
        if may_trim:  # unallocated objects read as zeros: librbd frees whole ones
            flags = 0
        elif fast:
            raise OSError(errno.ENOTSUP, "zeroing without holes writes every byte on RBD")
        else:
            flags = self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        await self._aio(lambda cb: self._image.aio_write_zeroes(offset, length, cb, flags))
        if fua:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        """Advisory: librbd has no read-ahead request, so nothing to do."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocated ranges from librbd's diff against the image's creation (object granularity
        where the image has no object map); the rest reads as zeros."""
        return await trio.to_thread.run_sync(self._extents, offset, length)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        data: list[tuple[int, int]] = []

        def seen(start: int, count: int, exists: bool) -> int:
            if exists:
                data.append((start, count))
            return 0

        self._image.diff_iterate(offset, length, None, seen)
        extents: list[Extent] = []
        at = offset
        stop = offset + length
        for start, count in sorted(data):
            start, end = max(start, at), min(start + count, stop)
            if end <= at:
                continue
            if start > at:
                extents.append(Extent(start - at, hole=True, zero=True))
            if extents and not extents[-1].hole and start <= at:
                extents[-1] = Extent(extents[-1].length + end - at)
            else:
                extents.append(Extent(end - start))
            at = end
            if len(extents) >= MAX_EXTENTS:
                return extents[:MAX_EXTENTS]
        if at < stop:
            extents.append(Extent(stop - at, hole=True, zero=True))
        return extents

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self.release()

    def release(self) -> None:
        """Close without flushing (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._image.close()
        self._ioctx.close()
        self._cluster.shutdown()

    # -- InlineIO: nothing of an RBD image is local, so every request takes the async path ----

    def try_read(self, offset: int, length: int) -> bytes | bytearray | FileRange | None:
        return None

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        return False

    def is_hole(self, offset: int, length: int) -> bool:
        return False

    # -- PipeSink: nor can a pipe be spliced into it (a proxy's cache here declines them) ----

    @property
    def takes_pipes(self) -> bool:
        return False

    def try_write_piped(self, offset: int, length: int, payload: PipedPayload) -> bool:
        return False

    # -- helpers -------------------------------------------------------------------------------

    @property
    def _rbd(self) -> ModuleType:
        return librbd()[1]

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EPERM, f"{self.path} is read-only")

    async def _thread(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking librbd call in one of the image's worker threads; librbd's errors as
        OSError with their errno."""
        try:
            result: T = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except self._rbd.Error as err:
            raise OSError(_errno_of(err), f"{self.path}: {err}") from None
        return result

    async def _aio(self, start: Callable[[Callable[..., None]], object]) -> Any:
        """Start one librbd aio request and wait for its completion; its result (a read's
        bytes) or OSError with librbd's errno. The wait is shielded: the request runs on in
        librbd whatever happens to the task, so its buffer and result stay ours until then."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[tuple[int, object]] = []

        def completed(completion: Any, *result: object) -> None:  # on a librbd thread
            outcome.append((completion.get_return_value(), result[0] if result else None))
            with contextlib.suppress(trio.RunFinishedError):  # the daemon is gone already
                token.run_sync_soon(done.set)

        try:
            start(completed)
        except Exception as err:  # refused before it started (closed image, bad arguments)
            raise OSError(_errno_of(err), f"{self.path}: {err}") from None
        with trio.CancelScope(shield=True):
            await done.wait()
        code, result = outcome[0]
        if code < 0:
            raise OSError(-code, f"{self.path}: {errno.errorcode.get(-code, code)}")
        return result
