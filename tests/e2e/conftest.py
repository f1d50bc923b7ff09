"""Fixtures for end-to-end tests against real systemd pieces (see systemd_fixtures.py)."""

from __future__ import annotations

import gc
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.ceph import CephCluster, CephError
from tests.e2e.ceph import start as start_ceph
from tests.e2e.rootfs import missing_builders, rootfs
from tests.e2e.systemd_fixtures import REPO, Journald, NotifyReceiver


@pytest.fixture(autouse=True)
def _collect_garbage_per_test() -> Iterator[None]:
    """Collect cycles after every end-to-end test, so that a pipe or socket a test left open
    fails that test (filterwarnings=error makes its ResourceWarning an error), not whichever
    later test runs when the collector does. (Unit tests are many and short, and a collection
    after each cost 40 s there.)"""
    yield
    gc.collect()


def daemon_command(*args: str) -> list[str]:
    """The daemon from this work tree (`python3 -m xnbdd` = xnbd-server)."""
    return [sys.executable, "-m", "xnbdd", *args]


def daemon_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.fixture
def notify() -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


@pytest.fixture(scope="module")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private journald needs root and unshare")
    if not Path("/lib/systemd/systemd-journald").exists():
        pytest.skip("systemd-journald is not installed (package systemd)")
    j = Journald(tmp_path_factory.mktemp("journald"))
    yield j
    j.stop()


@pytest.fixture(scope="session")
def systemd_tree() -> Path:
    """The cached Debian tree for nspawn (built on first use, several minutes)."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    missing = missing_builders() + [
        t for t in ("systemd-nspawn", "nsenter") if shutil.which(t) is None
    ]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container)")
    return rootfs()


@pytest.fixture(scope="session")
def trixie_tree() -> Path:
    """The cached Debian 13 tree with today's NBD clients and peers (tests/e2e/trixie.py)."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    missing = missing_builders() + [t for t in ("systemd-nspawn",) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container)")
    return rootfs("trixie")


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One real Ceph cluster (mon + memstore osd) for the session's RBD tests (tests/e2e/ceph.py).
    Where it cannot start, the tests skip with the reason, except on CI, where they fail."""
    try:
        cluster = start_ceph(tmp_path_factory.mktemp("ceph"))
    except CephError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Ceph test cluster did not start: {err}")
        pytest.skip(f"the Ceph test cluster did not start: {err}")
    yield cluster
    cluster.stop()
