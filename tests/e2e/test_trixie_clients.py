"""Debian 13's libnbd 1.22 and qemu 10 (tests/e2e/trixie.py) against the server on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.trixie import run_in_tree
from tests.serverproc import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.nspawn]


def test_trixie_tools_are_todays(trixie_tree: Path) -> None:
    nbdinfo = run_in_tree(trixie_tree, ["nbdinfo", "--version"]).stdout
    assert "libnbd 1.22." in nbdinfo, nbdinfo
    qemu = run_in_tree(trixie_tree, ["qemu-img", "--version"]).stdout
    assert qemu.startswith("qemu-img version 10."), qemu


def test_libnbd_1_22_reads_and_writes_through_the_host_server(
    trixie_tree: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(16 << 20)
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * (4 << 12))  # 4 MiB
    back = tmp_path / "back.bin"
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        info = run_in_tree(trixie_tree, ["nbdinfo", "--json", server.uri]).stdout
        assert '"export-size": 16777216' in info, info
        run_in_tree(
            trixie_tree,
            ["nbdcopy", "--destination-is-zero", str(source), server.uri],
            binds=[source],
        )
        run_in_tree(
            trixie_tree,
            ["nbdcopy", "--synchronous", server.uri, str(back)],
            writable=[tmp_path],
        )
    assert back.read_bytes()[: source.stat().st_size] == source.read_bytes()
