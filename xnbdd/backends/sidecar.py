"""The proxy's cache files: the image, its bitmap and the sidecar beside the bitmap
(docs/compat.md §4.5) that records the origin size the pair was made for, so a cache of another
origin is refused.

The sidecar is small JSON, replaced atomically. Blocking functions: call them in a worker thread.
"""

from __future__ import annotations

import json
import os
import stat

from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, nblocks_for
from xnbdd.backends.rbd import is_rbd

SIDECAR_SUFFIX = ".xnbdd"
SIDECAR_FORMAT = "xnbdd-proxy-cache"


class CacheMismatchError(ValueError):
    """The cache image or bitmap belongs to an origin of another size."""


def sidecar_path(bitmap_path: str) -> str:
    return bitmap_path + SIDECAR_SUFFIX


def read_sidecar(path: str) -> dict[str, object] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheMismatchError(f"{path}: unreadable cache metadata ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise CacheMismatchError(f"{path}: not an xnbdd cache metadata file")
    return data


def write_sidecar(path: str, data: dict[str, object]) -> None:
    """Atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def prepare_cache_files(
    cache_path: str, bitmap_path: str, size: int, *, clear: bool, remote: str
) -> Bitmap:
    """Create or check the cache image and bitmap for an origin of ``size`` bytes (blocking).

    The image is created sparse (mode 0600) or extended to ``size``; a regular file larger than
    the origin, a bitmap of another size or a sidecar naming another size are refused unless
    ``clear`` (then the image is cut to size and the bitmap zeroed).
    """
    nblocks = nblocks_for(size)
    meta_path = sidecar_path(bitmap_path)
    meta = None if clear else read_sidecar(meta_path)
    if meta is not None and meta.get("upstream_size") != size:
        raise CacheMismatchError(
            f"cache {cache_path} was made for an origin of {meta.get('upstream_size')} bytes, "
            f"but {remote} exports {size} bytes (use --clear-bitmap to start over)"
        )
    if not is_rbd(cache_path):  # an RBD cache image is sized by RbdBackend.open_cache
        fd = os.open(cache_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                if st.st_size > size and not clear:
                    raise CacheMismatchError(
                        f"cache {cache_path} is {st.st_size} bytes, larger than the origin's "
                        f"{size} bytes (use --clear-bitmap to cut it to size and start over)"
                    )
                if st.st_size != size:
                    os.ftruncate(fd, size)  # sparse extension, or a cut with clear
                    os.fsync(fd)
            elif not stat.S_ISBLK(st.st_mode):
                raise CacheMismatchError(f"cache {cache_path}: not a regular file or block device")
        finally:
            os.close(fd)
    try:
        bitmap = Bitmap.open(bitmap_path, nblocks, clear=clear)
    except ValueError as exc:
        raise CacheMismatchError(f"{exc} (use --clear-bitmap to start over)") from exc
    try:
        write_sidecar(
            meta_path,
            {
                "format": SIDECAR_FORMAT,
                "version": 1,
                "upstream_size": size,
                "block_size": BLOCK_SIZE,
                "remote": remote,
            },
        )
    except BaseException:
        bitmap.close()
        raise
    return bitmap
