"""The unit files under units/: systemd's own linter accepts them, and the services stay hardened.

The units run `xnbd-server` (or `xnbd-wrapper`) from systemd's executable search path
(/usr/local/bin, /usr/bin, ...), where a build host has no such program; systemd-analyze resolves
that path itself and ignores $PATH, so the copies checked here name a stand-in program by its
absolute path instead. The files exactly as shipped are verified inside a booted container in
tests/e2e/test_nspawn.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "units"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (package systemd) is not installed",
)

# Each file under the name systemd gives it when used: templates need an instance. (An Accept=yes
# instance is really called "xnbd-conn@0-127.0.0.1:10809-127.0.0.1:41234.service"; the colons
# trip systemd-analyze's alias handling, so a plain instance stands in for it.)
INSTANCES = {
    "xnbd@.service": "xnbd@disk.service",
    "xnbd@.socket": "xnbd@disk.socket",
    "xnbd-conn.socket": "xnbd-conn.socket",
    "xnbd-conn@.service": "xnbd-conn@7.service",
    "xnbd-wrapper.service": "xnbd-wrapper.service",
    "xnbd-wrapper.socket": "xnbd-wrapper.socket",
    "xnbd-export@.service": "xnbd-export@alpha.service",
}
SERVICES = [name for name in INSTANCES.values() if name.endswith(".service")]


def test_every_unit_file_is_covered() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(INSTANCES)


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("units")
    stand_in = base / "xnbd-server"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    out = base / "system"
    out.mkdir()
    for source, name in INSTANCES.items():
        text = (UNITS / source).read_text()
        program = re.compile(r"^(ExecStart=-?)xnbd-[a-z]+ ", re.M)
        assert program.search(text) or source.endswith(".socket")
        text = program.sub(rf"\g<1>{stand_in} ", text)
        (out / name).write_text(text)
        (out / source).write_text(text)  # the template too: a socket names its service by it
    return out


@pytest.mark.parametrize("name", list(INSTANCES.values()))
def test_systemd_analyze_verify(unit_dir: Path, name: str) -> None:
    # --man=no: the man page is checked where it is installed (the Debian package), not here.
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_dir / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def exposure(unit_dir: Path, name: str) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_dir / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_security_exposure(unit_dir: Path, name: str) -> None:
    assert exposure(unit_dir, name) <= MAX_EXPOSURE


def test_a_weakened_unit_scores_worse(unit_dir: Path, tmp_path: Path) -> None:
    """The exposure test can fail: without the sandbox the same service scores far above."""
    bare = tmp_path / "xnbd@bare.service"
    text = (unit_dir / "xnbd@disk.service").read_text()
    kept = [
        line
        for line in text.splitlines()
        if not re.match(r"(Protect|Private|Restrict|SystemCall|Capability|NoNew|Lock|Memory)", line)
    ]
    bare.write_text("\n".join(kept) + "\n")
    assert exposure(tmp_path, bare.name) > 5.0
