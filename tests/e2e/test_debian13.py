"""The Debian package on Debian 12 and Debian 13 (packaging/debian, scripts/build-deb.sh).

It is built twice: on the host (Debian 12) and in the cached Debian 13 tree (build-deb.sh --in,
a throwaway nspawn container), and each release's lintian must find no error and no warning;
units go where that release's debhelper puts them. The Debian 13 package is then installed with
dpkg in the Debian 13 tree booted with systemd 257 as PID 1 (--volatile=overlay: the cached tree
is never changed), where xnbd@disk.service serves libnbd 1.22's nbdcopy; the image is a host
file, so every byte written is checked here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import REPO, Container

pytestmark = [pytest.mark.e2e, pytest.mark.nspawn]

UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer")
IMAGE_SIZE = 32 << 20
PORT = 10811
DISK_CONF = f"mode = target\nimage = /var/lib/xnbd/disk.img\nlport = {PORT}\n"


@dataclass(frozen=True)
class Build:
    deb: Path
    output: str  # build-deb.sh's stdout: the lintian report
    contents: list[str]  # paths in the .deb, without the leading "."


def build(*args: str) -> Build:
    if missing := [t for t in ("dpkg-buildpackage", "lintian", "git") if not shutil.which(t)]:
        reason = f"missing {', '.join(missing)} (scripts/bootstrap.sh deb installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    proc = subprocess.run(
        [str(REPO / "scripts/build-deb.sh"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"build-deb.sh {args} failed:\n{proc.stdout}\n{proc.stderr}"
    deb = Path(proc.stdout.strip().splitlines()[-1].strip())
    listing = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    names = subprocess.run(
        ["tar", "-t"], input=listing, capture_output=True, check=True
    ).stdout.decode()
    contents = [n.removeprefix(".").rstrip("/") for n in names.splitlines()]
    return Build(deb=deb, output=proc.stdout, contents=[c for c in contents if c])


@pytest.fixture(scope="module")
def deb12(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """Built on the host: the project's build and test host is Debian 12."""
    release = Path("/etc/os-release").read_text()
    if not re.search(r'^VERSION_ID="?12"?$', release, re.M):
        pytest.skip("the host is not Debian 12 (its build is checked on Debian 12 hosts)")
    return build(str(tmp_path_factory.mktemp("deb12")))


@pytest.fixture(scope="module")
def deb13(trixie_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    return build("--in", str(trixie_tree), str(tmp_path_factory.mktemp("deb13")))


def lintian_tags(output: str) -> list[str]:
    """lintian's E:/W: lines (I: and N: are information)."""
    return [line for line in output.splitlines() if re.match(r"[EW]: ", line)]


def units_in(contents: list[str]) -> dict[str, str]:
    """Unit file name -> its directory, for the units the package ships."""
    return {
        os.path.basename(p): os.path.dirname(p)
        for p in contents
        if p.endswith(UNIT_SUFFIXES) and "/systemd/system/" in p
    }


def shipped_units() -> list[str]:
    return sorted(p.name for p in (REPO / "units").iterdir() if p.name.endswith(UNIT_SUFFIXES))


def test_debian12_lintian_clean_units_in_lib(deb12: Build) -> None:
    assert "(Debian GNU/Linux 12 (bookworm))" in deb12.output, deb12.output
    assert lintian_tags(deb12.output) == [], deb12.output
    units = units_in(deb12.contents)
    assert sorted(units) == shipped_units()
    assert set(units.values()) == {"/lib/systemd/system"}


def test_debian13_lintian_clean_units_in_usr_lib(deb13: Build) -> None:
    assert "(Debian GNU/Linux 13 (trixie))" in deb13.output, deb13.output
    assert lintian_tags(deb13.output) == [], deb13.output
    units = units_in(deb13.contents)
    assert sorted(units) == shipped_units()
    assert set(units.values()) == {"/usr/lib/systemd/system"}
    assert not [p for p in deb13.contents if p.startswith("/lib/")]


def documentation(unit_text: str) -> list[str]:
    return [
        u for line in re.findall(r"^Documentation=(.*)$", unit_text, re.M) for u in line.split()
    ]


@pytest.mark.parametrize("release", ["deb12", "deb13"])
def test_units_name_only_documentation_the_package_ships(
    release: str, request: pytest.FixtureRequest
) -> None:
    built: Build = request.getfixturevalue(release)
    contents = set(built.contents)
    named = {
        u for unit in shipped_units() for u in documentation((REPO / "units" / unit).read_text())
    }
    assert any(u.startswith("file:/usr/share/doc/") for u in named)  # the check covers docs
    # The man pages point at docs/ too: all of it ships, uncompressed.
    for doc in (REPO / "docs").glob("*.md"):
        assert f"/usr/share/doc/xnbdd/{doc.name}" in contents, doc.name
    for uri in sorted(named):
        if uri.startswith("file:"):
            assert uri.removeprefix("file:") in contents, f"{uri} is not in {built.deb.name}"
        else:
            page = re.fullmatch(r"man:([\w.-]+)\((\d)\)", uri)
            assert page, f"unexpected Documentation= {uri}"
            path = f"/usr/share/man/man{page[2]}/{page[1]}.{page[2]}.gz"
            assert path in contents, f"{uri}: no {path} in {built.deb.name}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The container's /var/lib/xnbd, on the host."""
    path = tmp_path_factory.mktemp("deb13-data")
    with open(path / "disk.img", "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def box(
    trixie_tree: Path, deb13: Build, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("deb13-boot")
    io = work / "io"
    io.mkdir()
    binds = {
        str(deb13.deb.parent): "/var/tmp/debs",
        str(data): "/var/lib/xnbd",
        str(io): "/var/tmp/io",
    }
    container = Container(trixie_tree, work, binds, writable=(str(data), str(io)))
    try:
        container.run("dpkg", "-i", f"/var/tmp/debs/{deb13.deb.name}", timeout=120)
        container.run("sh", "-c", f"printf '{DISK_CONF}' > /etc/xnbd/disk.conf")
        yield container
    finally:
        container.poweroff()


def test_the_container_runs_systemd_257(box: Container) -> None:
    version = box.run("systemctl", "--version").stdout
    assert version.startswith("systemd 257 "), version


def test_installed_units_verify_and_their_documentation_exists(box: Container) -> None:
    owned = box.run("dpkg", "-L", "xnbdd").stdout.split()
    units = [p for p in owned if p.endswith(UNIT_SUFFIXES)]
    assert sorted(os.path.basename(u) for u in units) == shipped_units()
    assert all(u.startswith("/usr/lib/systemd/system/") for u in units), units
    for unit in units:
        for uri in documentation(box.run("cat", unit).stdout):
            if uri.startswith("file:"):
                box.run("test", "-s", uri.removeprefix("file:"))
    proc = box.run(
        "systemd-analyze", "verify", "--man=no",
        "xnbd@disk.service", "xnbd@sock.socket", "xnbd-conn.socket", "xnbd-wrapper.service",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_xnbd_disk_service_serves_libnbd_1_22(box: Container, data: Path) -> None:
    unit = "xnbd@disk.service"
    box.run("systemctl", "start", unit)  # Type=notify: returns once the daemon is serving
    try:
        state = box.show(unit, "ActiveState", "SubState", "MainPID")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        # The packaged program (python3 runs the /usr/bin/xnbd-server script).
        argv = box.run("cat", f"/proc/{state['MainPID']}/cmdline").stdout.split("\0")
        assert "/usr/bin/xnbd-server" in argv, argv
        uri = f"nbd://127.0.0.1:{PORT}/disk"
        info = box.run("nbdinfo", "--json", uri).stdout
        assert f'"export-size": {IMAGE_SIZE}' in info, info
        payload = os.urandom(3 << 20)
        io_dir = box.workdir / "io"  # the container's /var/tmp/io
        (io_dir / "src.bin").write_bytes(b"\0" * (1 << 20) + payload)
        box.run("nbdcopy", "/var/tmp/io/src.bin", uri)
        box.run("nbdcopy", uri, "/var/tmp/io/back.bin")
        back = (io_dir / "back.bin").read_bytes()
        assert len(back) == IMAGE_SIZE
        assert back[1 << 20 : 4 << 20] == payload
        with open(data / "disk.img", "rb") as f:
            f.seek(1 << 20)
            assert f.read(3 << 20) == payload
    finally:
        box.run("systemctl", "stop", unit, check=False)
    assert box.show(unit, "Result", "ExecMainStatus") == {
        "Result": "success",
        "ExecMainStatus": "0",
    }
