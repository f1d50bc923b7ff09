"""A full file system under the proxy cache and the cow overlay (issue 15), with a real small
tmpfs: a read never fails because caching failed, FLUSH fails only while the space is missing,
writes that cannot be stored get ENOSPC and later ones succeed once space is back, and the daemon
recovers and stops cleanly (exit 0) without a restart. Clients: python3-libnbd."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.loopdev import mounted_fs
from tests.e2e.mounts import small_tmpfs
from tests.e2e.test_proxy_e2e import BLOCK, connect, query
from tests.libnbd import import_nbd
from tests.origin_servers import nbdkit, random_image
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

SIZE = 8 << 20
CHUNK = 64 * 1024


def fill(directory: Path) -> Path:
    """Take every free byte of the file system with one file; returns it (delete to free)."""
    filler = directory / "filler"
    block = b"\xee" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
        for size in (65536, 4096):  # the last partial pages too
            while True:
                try:
                    f.write(block[:size])
                except OSError:
                    break
    return filler


@contextlib.contextmanager
def small_fs(kind: str, tmp_path: Path) -> Iterator[Path]:
    """A small file system to fill: a 2 MiB tmpfs, or a 16 MiB ext4 on a loop device (where
    data goes through the page cache and a writeback could fail)."""
    if kind == "tmpfs":
        with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
            yield mnt
    else:
        with mounted_fs(tmp_path, "ext4", 16 << 20) as mnt:
            yield mnt


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_proxy_cache_on_a_full_file_system(tmp_path: Path, kind: str) -> None:
    nbd = import_nbd()
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with (
        small_fs(kind, tmp_path) as mnt,
        nbdkit(tmp_path, ["file", str(image)]) as origin,
    ):
        ctl = tmp_path / "proxy.ctl"
        args = [
            "--proxy",
            origin.host,
            origin.port,
            str(mnt / "c.img"),
            str(mnt / "c.bm"),
            str(ctl),
        ]
        with running_server(*args, tmp_path=tmp_path) as proxy:
            handle = connect(proxy.uri)
            assert handle.pread(CHUNK, 0) == data[:CHUNK]  # bits not yet on disk
            cached = query(ctl)["cached_blocks"]
            filler = fill(mnt)
            # a FLUSH may fail while the space is missing, with ENOSPC (on tmpfs it must: the
            # sparse bitmap file has no page for the bits; ext4 gave it a block at creation)
            try:
                handle.flush()
            except nbd.Error as unflushed:
                assert unflushed.errnum == errno.ENOSPC
            else:
                assert kind != "tmpfs", "FLUSH succeeded although the bits had no room"
            # uncached reads are served from the origin although nothing can be cached
            for offset in (1 << 20, 3 << 20, 5 << 20):
                assert handle.pread(CHUNK, offset) == data[offset : offset + CHUNK]
            assert query(ctl)["cached_blocks"] == cached  # no bit for data not stored
            assert handle.pread(CHUNK, 1 << 20) == data[1 << 20 : (1 << 20) + CHUNK]
            # a write that cannot be stored is refused with ENOSPC
            with pytest.raises(nbd.Error) as refused:
                handle.pwrite(b"\x11" * CHUNK, 6 << 20)
            assert refused.value.errnum == errno.ENOSPC
            assert "not cached" in proxy.log()
            # space comes back: everything works again, nothing sticky
            filler.unlink()
            handle.flush()
            handle.pwrite(b"\x22" * CHUNK, 6 << 20)
            handle.flush()
            assert handle.pread(CHUNK, 6 << 20) == b"\x22" * CHUNK
            assert handle.pread(CHUNK, 3 << 20) == data[3 << 20 : (3 << 20) + CHUNK]
            assert query(ctl)["cached_blocks"] == cached + 2 * CHUNK // BLOCK
            handle.shutdown()
        # running_server asserted exit status 0 after SIGTERM


def test_cow_overlay_on_a_full_file_system(tmp_path: Path) -> None:
    nbd = import_nbd()
    base = tmp_path / "base.img"
    data = random_image(base, SIZE)
    with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
        args = ["--cow-target", "--cow-dir", str(mnt), str(base)]
        with running_server(*args, tmp_path=tmp_path) as server:
            handle = connect(server.uri)
            handle.pwrite(b"\x01" * CHUNK, 0)
            handle.flush()
            filler = fill(mnt)
            with pytest.raises(nbd.Error) as refused:
                handle.pwrite(b"\x02" * CHUNK, 4 << 20)
            assert refused.value.errnum == errno.ENOSPC
            # a partial-block write needs a copy-up: refused the same way
            with pytest.raises(nbd.Error) as refused:
                handle.pwrite(b"\x03" * 100, (5 << 20) + 10)
            assert refused.value.errnum == errno.ENOSPC
            # what was not stored still reads as the base, what was stored as written
            assert handle.pread(CHUNK, 0) == b"\x01" * CHUNK
            assert handle.pread(100, (5 << 20) + 10) == data[(5 << 20) + 10 : (5 << 20) + 110]
            filler.unlink()
            handle.pwrite(b"\x02" * CHUNK, 4 << 20)
            handle.pwrite(b"\x03" * 100, (5 << 20) + 10)
            handle.flush()
            assert handle.pread(CHUNK, 4 << 20) == b"\x02" * CHUNK
            assert handle.pread(100, (5 << 20) + 10) == b"\x03" * 100
            handle.shutdown()
        assert base.read_bytes() == data
        assert os.listdir(mnt) == []  # the overlay is removed at exit


def test_proxy_stops_cleanly_while_the_cache_file_system_is_full(tmp_path: Path) -> None:
    """SIGTERM with bits that cannot be persisted: the cache stays consistent (a bit is only on
    disk after its data), so the stop is clean -- exit 0, with the reason in the log."""
    image = tmp_path / "origin.img"
    data = random_image(image, SIZE)
    with (
        small_tmpfs(tmp_path / "mnt", "2m") as mnt,
        nbdkit(tmp_path, ["file", str(image)]) as origin,
    ):
        ctl = tmp_path / "proxy.ctl"
        bitmap = mnt / "c.bm"
        args = ["--proxy", origin.host, origin.port, str(mnt / "c.img"), str(bitmap), str(ctl)]
        with running_server(*args, tmp_path=tmp_path) as proxy:
            handle = connect(proxy.uri)
            assert handle.pread(CHUNK, 0) == data[:CHUNK]  # bits only in memory so far
            fill(mnt)
            handle.shutdown()
        assert "not persisted" in proxy.log(), proxy.log()
        # what is on disk is consistent: no bit without its data (here: no bit at all)
        assert not any(bitmap.read_bytes())
