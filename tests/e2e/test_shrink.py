"""An image truncated under a live ``--target`` server (issue 15): one rule, EIO for what is no
longer there and never invented zeros -- simple and structured replies, 4 KiB and large READs
(the tmpfs sendfile and hole paths, the disk page-cache path); writes past the new end get
ENOSPC and never grow the file; the new size is logged and told to new clients (nbdinfo)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import rawnbd
from tests.e2e.mounts import small_tmpfs
from tests.e2e.test_proxy_e2e import query
from tests.origin_servers import need, random_image
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SIZE = 4 * MIB
NEW_SIZE = 2 * MIB


def read_status(
    client: rawnbd.RawClient, structured: bool, offset: int, length: int
) -> tuple[int, bytes]:
    """(error, data) of one READ; a structured reply must be one data chunk or an error."""
    client.request(rawnbd.CMD_READ, offset, length, cookie=7)
    if not structured:
        error, _cookie, data = client.simple_reply(length)
        return error, data
    got = bytearray()
    error = 0
    for flags, kind, _cookie, payload in client.structured_reply():
        if kind == 1:  # OFFSET_DATA
            got += payload[8:]
        elif kind == 2:  # OFFSET_HOLE: zeros the server would be inventing
            raise AssertionError(f"hole chunk for a range past the end (flags {flags})")
        elif kind & 0x8000:
            error = int.from_bytes(payload[:4], "big")
    return error, bytes(got)


def check_shrunk(directory: Path, tmp_path: Path) -> None:
    image = directory / "disk.img"
    original = random_image(image, SIZE)
    ctl = tmp_path / "target.ctl"
    args = ("--target", "--control-socket", str(ctl), str(image))
    with running_server(*args, tmp_path=tmp_path) as server:
        simple = rawnbd.RawClient(server.port)
        simple.go()
        structured = rawnbd.RawClient(server.port)
        structured.go(structured=True)
        for client, is_structured in ((simple, False), (structured, True)):  # warm the caches
            assert read_status(client, is_structured, 3 * MIB, 256 * 1024)[0] == 0
        os.truncate(image, NEW_SIZE)
        for client, is_structured in ((simple, False), (structured, True)):
            for offset, length in (
                (3 * MIB, 4096),
                (3 * MIB, 64 * 1024),
                (3 * MIB, 256 * 1024),
                (NEW_SIZE - 4096, 64 * 1024),  # straddles the new end
                (NEW_SIZE, 4096),
            ):
                error, data = read_status(client, is_structured, offset, length)
                assert error == rawnbd.EIO, (is_structured, offset, length, error, len(data))
            # the connection is still in step and what is there reads right
            error, data = read_status(client, is_structured, NEW_SIZE - 8192, 8192)
            assert error == 0 and data == original[NEW_SIZE - 8192 : NEW_SIZE]
            # a write past the new end is refused and does not grow the file
            client.request(rawnbd.CMD_WRITE, 3 * MIB, 4096, cookie=9, data=b"x" * 4096)
            if is_structured:
                error = int.from_bytes(client.structured_reply()[-1][3][:4], "big")
            else:
                error = client.simple_reply()[0]
            assert error == rawnbd.ENOSPC
            assert image.stat().st_size == NEW_SIZE
        simple.close()
        structured.close()
        # a new client is told the truth
        size = subprocess.run(
            [need("nbdinfo"), "--size", server.uri], capture_output=True, text=True, check=True
        ).stdout
        assert int(size) == NEW_SIZE
        assert query(ctl)["size"] == NEW_SIZE  # the control socket's STATUS
        assert f"changed size from {SIZE} to {NEW_SIZE} bytes" in server.log()


def test_truncated_on_tmpfs(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "16m") as mnt:
        check_shrunk(mnt, tmp_path)


def test_truncated_on_disk(tmp_path: Path) -> None:
    check_shrunk(tmp_path, tmp_path)
