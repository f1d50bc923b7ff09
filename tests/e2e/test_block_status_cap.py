"""BLOCK_STATUS answers at most 4,096 extents per reply (the server's cap, docs/faults.md): a
heavily fragmented image (alternating 4 KiB data and holes) through python3-libnbd and nbdinfo
--map. Each reply stays under the cap, a reply covers a prefix of what was asked, and a client
that continues from where the reply ended gets the whole map, exactly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.libnbd import import_nbd
from tests.origin_servers import need
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e

BLOCK = 4096
PAIRS = 6000  # data, hole, data, hole...: 12,000 extents, about three replies' worth
SIZE = 2 * PAIRS * BLOCK
CAP = 4096


def fragmented(path: Path) -> list[tuple[int, int]]:
    """(length, flags) of every extent; base:allocation flags: 3 = hole and zero."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(PAIRS):
            os.pwrite(f.fileno(), b"\x5a" * BLOCK, 2 * i * BLOCK)
    return [(BLOCK, 0), (BLOCK, 3)] * PAIRS


def test_fragmented_image_map_is_capped_per_reply_and_complete(tmp_path: Path) -> None:
    nbd = import_nbd()
    image = tmp_path / "frag.img"
    expected = fragmented(image)
    with running_server("--target", "--readonly", str(image), tmp_path=tmp_path) as server:
        handle = nbd.NBD()
        handle.add_meta_context("base:allocation")
        handle.connect_uri(server.uri)
        got: list[tuple[int, int]] = []
        per_reply: list[int] = []

        def extents(context: str, offset: int, entries: list[int], error: int) -> int:
            assert context == "base:allocation"
            pairs = list(zip(entries[::2], entries[1::2], strict=True))
            per_reply.append(len(pairs))
            got.extend(pairs)
            return 0

        offset = 0
        while offset < SIZE:
            before = sum(length for length, _flags in got)
            handle.block_status(SIZE - offset, offset, extents)
            covered = sum(length for length, _flags in got) - before
            assert 0 < covered <= SIZE - offset
            offset += covered
        handle.shutdown()
        assert max(per_reply) <= CAP
        assert len(per_reply) >= len(expected) // CAP  # the cap really applied
        assert got == expected
        # nbdinfo --map continues on its own: every extent, in order
        out = subprocess.run(
            [need("nbdinfo"), "--map", server.uri],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.splitlines()
        assert len(out) == len(expected), out[:5]
        for line, (length, flags) in zip(out, expected, strict=True):
            fields = line.split()
            assert (int(fields[1]), int(fields[2])) == (length, flags), line
