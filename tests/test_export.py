"""The transmission flags an export derives from its backend and how it is served."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from xnbdd.backends.cow import CowBackend
from xnbdd.backends.file import FileBackend
from xnbdd.export import Export
from xnbdd.proto.consts import TxFlag


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.mark.parametrize("one_connection", [False, True])
async def test_a_file_shares_its_writes_with_other_processes(
    base: Path, one_connection: bool
) -> None:
    backend = await trio.to_thread.run_sync(lambda: FileBackend.open(str(base), readonly=False))
    try:
        export = Export("", backend, one_connection=one_connection)
        assert export.tx_flags() & TxFlag.CAN_MULTI_CONN
    finally:
        await backend.close()


@pytest.mark.parametrize(("one_connection", "multi_conn"), [(False, True), (True, False)])
async def test_a_cow_overlay_is_shared_only_within_its_process(
    base: Path, one_connection: bool, multi_conn: bool
) -> None:
    backend = await trio.to_thread.run_sync(CowBackend.open, str(base))
    try:
        export = Export("", backend, one_connection=one_connection)
        assert bool(export.tx_flags() & TxFlag.CAN_MULTI_CONN) is multi_conn
    finally:
        await backend.close()


@pytest.mark.parametrize("rotational", [False, True])
async def test_rotational_is_the_exports_to_say(base: Path, rotational: bool) -> None:
    backend = await trio.to_thread.run_sync(lambda: FileBackend.open(str(base), readonly=False))
    try:
        flags = Export("", backend, rotational=rotational).tx_flags()
        assert bool(flags & TxFlag.ROTATIONAL) is rotational
    finally:
        await backend.close()
