"""The error cases of the protocol checklist through python3-libnbd (strict mode off, so
libnbd sends what it would normally refuse), and 64 requests in flight through its aio API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import ServerProcess, running_server

pytestmark = pytest.mark.e2e

SIZE = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def nbd() -> Any:
    return import_nbd()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("libnbd")
    image = tmp / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    with running_server("--target", str(image), tmp_path=tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def readonly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("libnbd-ro")
    image = tmp / "disk.img"
    image.write_bytes(b"r" * SIZE)
    with running_server("--target", str(image), "--readonly", tmp_path=tmp) as srv:
        yield srv


def connect(nbd: Any, srv: ServerProcess) -> Any:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(srv.uri)
    h.set_strict_mode(0)
    return h


def errno_of(nbd: Any, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(nbd.Error) as failure:
        call(*args, **kwargs)
    return str(failure.value.errno)


def test_range_errors(nbd: Any, server: ServerProcess) -> None:
    h = connect(nbd, server)
    assert errno_of(nbd, h.pwrite, b"x" * 512, SIZE - 256) == "ENOSPC"
    assert errno_of(nbd, h.zero, 1024, SIZE - 512) == "ENOSPC"
    assert errno_of(nbd, h.pread, 512, SIZE - 256) == "EINVAL"
    assert errno_of(nbd, h.trim, 1024, SIZE - 512) == "EINVAL"
    assert errno_of(nbd, h.cache, 1024, SIZE - 512) == "EINVAL"
    assert errno_of(nbd, h.block_status, 1024, SIZE - 512, lambda *a: 0) == "EINVAL"
    assert h.pread(16, 0) == bytes(16)  # and the connection is fine
    h.shutdown()


def test_unknown_flags_are_einval(nbd: Any, server: ServerProcess) -> None:
    h = connect(nbd, server)
    assert errno_of(nbd, h.pread, 512, 0, flags=0x80) == "EINVAL"
    assert errno_of(nbd, h.pwrite, b"y" * 512, 0, flags=nbd.CMD_FLAG_DF) == "EINVAL"
    assert errno_of(nbd, h.trim, 512, 0, flags=nbd.CMD_FLAG_NO_HOLE) == "EINVAL"
    h.pwrite(b"z" * 512, 0, flags=nbd.CMD_FLAG_FUA)
    assert h.pread(512, 0) == b"z" * 512
    h.shutdown()


def test_write_zeroes_flags(nbd: Any, server: ServerProcess) -> None:
    h = connect(nbd, server)
    h.pwrite(b"q" * 65536, 65536)
    h.zero(65536, 65536, flags=nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 65536) == bytes(65536)
    h.pwrite(b"q" * 65536, 65536)
    try:
        h.zero(65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:  # allowed: fast zero refused, contents unchanged
        assert e.errno == "ENOTSUP"
        assert h.pread(65536, 65536) == b"q" * 65536
    else:
        assert h.pread(65536, 65536) == bytes(65536)
    h.shutdown()


def test_read_only_export_is_eperm(nbd: Any, readonly: ServerProcess) -> None:
    h = connect(nbd, readonly)
    assert h.is_read_only()
    assert errno_of(nbd, h.pwrite, b"w" * 512, 0) == "EPERM"
    assert errno_of(nbd, h.trim, 512, 0) in ("EPERM", "EINVAL")  # TRIM is not advertised
    assert errno_of(nbd, h.zero, 512, 0) in ("EPERM", "EINVAL")
    assert h.pread(512, 0) == b"r" * 512
    h.shutdown()


def test_sixty_four_requests_in_flight(nbd: Any, server: ServerProcess) -> None:
    h = connect(nbd, server)
    blocks = [os.urandom(4096) for _ in range(64)]
    cookies = [h.aio_pwrite(blocks[i], 4 * 1024 * 1024 + i * 4096) for i in range(64)]
    assert h.aio_in_flight() > 1
    while h.aio_in_flight():
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)
    buffers = [nbd.Buffer(4096) for _ in range(64)]
    cookies = [h.aio_pread(buffers[i], 4 * 1024 * 1024 + i * 4096) for i in range(64)]
    while h.aio_in_flight():
        h.poll(-1)
    for i, cookie in enumerate(cookies):
        assert h.aio_command_completed(cookie)
        assert buffers[i].to_bytearray() == blocks[i]
    h.shutdown()
