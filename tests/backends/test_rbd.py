"""rbd:POOL/IMAGE[@SNAP] parsing and the start-up message without Ceph's Python bindings (the
cluster itself: tests/e2e/test_rbd.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.serverproc import server_command, server_env
from xnbdd.backends.rbd import RbdSpec


def test_spec_parses_pool_image_and_snapshot() -> None:
    assert RbdSpec.parse("rbd:pool/disk") == RbdSpec("pool", "disk")
    assert RbdSpec.parse("rbd:pool/disk@monday") == RbdSpec("pool", "disk", "monday")
    assert str(RbdSpec.parse("rbd:pool/disk@monday")) == "rbd:pool/disk@monday"


@pytest.mark.parametrize(
    "bad", ["rbd:", "rbd:pool", "rbd:/disk", "rbd:pool/", "rbd:a/b/c", "rbd:a/b@"]
)
def test_spec_refuses_anything_else(bad: str) -> None:
    with pytest.raises(ValueError, match="not rbd:POOL/IMAGE"):
        RbdSpec.parse(bad)


def test_missing_bindings_are_one_line_at_start_up(tmp_path: Path) -> None:
    """A module named rbd that cannot be imported stands in for python3-rbd not installed."""
    fake = tmp_path / "no-ceph"
    for name in ("rados", "rbd"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('No module named {name}', name='{name}')\n"
        )
    env = server_env()
    env["PYTHONPATH"] = f"{fake}:{env['PYTHONPATH']}"
    done = subprocess.run(
        server_command("--target", "rbd:pool/disk", "--lport", "1", "--laddr", "127.0.0.1"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "apt-get install python3-rbd python3-rados" in done.stderr, done.stderr
