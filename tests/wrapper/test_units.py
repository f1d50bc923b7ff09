"""xnbdd/wrapper/units.py: instance names by systemd's own rules, and configuration files that
give the unit's xnbd-server exactly the settings the child process would have had."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.cli.server import Settings, make_options, parse
from xnbdd.config import ConfigError
from xnbdd.wrapper.registry import ExportEntry
from xnbdd.wrapper.supervisor import ServerSettings, server_args
from xnbdd.wrapper.units import (
    UnitError,
    config_path,
    escape_instance,
    export_config,
    unit_name,
    write_config,
)

needs_systemd_escape = pytest.mark.skipif(
    shutil.which("systemd-escape") is None, reason="systemd-escape (package systemd) missing"
)

# Names as users give them: with '/', '-', dots, blanks, non-ASCII, and a '..' escape attempt.
NAMES = [
    "alpha",
    "team/disk-1",
    "/srv/xnbd/a.img",
    ".hidden",
    "../../etc/passwd",
    "a b\\c",
    "dísk✓",
    "x:y_z.img",
    "-",
]


def systemd_escape(name: str) -> str:
    done = subprocess.run(
        ["systemd-escape", "--", name], capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.rstrip("\n")


@needs_systemd_escape
@pytest.mark.parametrize("name", NAMES)
def test_escape_matches_systemd_escape(name: str) -> None:
    escaped = escape_instance(name)
    assert escaped == systemd_escape(name)
    assert "/" not in escaped and not escaped.startswith(".")
    back = subprocess.run(
        ["systemd-escape", "--unescape", "--", escaped],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.rstrip("\n")
    assert back == name


# Export names as the registry accepts them (xnbdd/wrapper/registry.py check_name).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)


@needs_systemd_escape
@settings(max_examples=60, deadline=None)
@given(names)
def test_escape_matches_systemd_escape_for_any_name(name: str) -> None:
    assert escape_instance(name) == systemd_escape(name)


@given(names, names)
def test_different_names_never_share_a_unit(a: str, b: str) -> None:
    assert (escape_instance(a) == escape_instance(b)) == (a == b)


def test_unit_name_and_its_length_limit() -> None:
    assert unit_name("team/disk-1") == "xnbd-export@team-disk\\x2d1.service"
    assert len(unit_name("a" * 235)) == 255  # systemd's maximum
    with pytest.raises(UnitError, match="too long for a systemd unit"):
        unit_name("a" * 236)
    with pytest.raises(UnitError, match="too long"):
        unit_name("/" + "é" * 40)  # 80 bytes, each escaped to 4 characters


def test_config_path_stays_inside_the_directory(tmp_path: Path) -> None:
    for name in NAMES:
        path = config_path(unit_name(name), str(tmp_path))
        assert os.path.dirname(path) == str(tmp_path), path
        assert path.endswith(".conf")


SETTINGS = ServerSettings(
    command=["xnbd-server"], run_dir="/run/x", max_queue_size="64", max_buf_size="1048576"
)
NOT_COMPARED = ("config", "command_line_keys")  # where the settings came from


def server_view(settings: Settings) -> dict[str, object]:
    """The options xnbd-server runs with, plus where it takes its clients from."""
    options = asdict(make_options(settings))
    for key in NOT_COMPARED:
        options.pop(key)
    options["handoff_socket"] = settings.handoff_socket
    return options


def from_file(entry: ExportEntry, tmp_path: Path) -> dict[str, object]:
    """What xnbd-server makes of the file the wrapper writes for the unit."""
    text = export_config(
        entry,
        "/run/xnbd-wrapper/exports/export-0123.sock",
        max_queue_size=SETTINGS.max_queue_size,
        max_buf_size=SETTINGS.max_buf_size,
    )
    path = tmp_path / "export.conf"
    write_config(str(path), text)
    return server_view(parse(["--config", str(path)]))


def from_child_args(entry: ExportEntry) -> dict[str, object]:
    """What xnbd-server makes of the command line a child process gets."""
    args = server_args(entry, SETTINGS, "/run/xnbd-wrapper/exports/export-0123.sock")
    return server_view(parse(args[1:]))


ENTRIES = [
    ExportEntry(name="alpha", mode="target", image="/var/lib/xnbd/alpha.img"),
    ExportEntry(
        name=" team/disk = 1 # ",
        mode="target",
        image="/srv/xnbd/a b.img",
        cow=True,
        readonly=True,
        description='"quoted" and  blanks ',
    ),
    ExportEntry(
        name="cache",
        mode="proxy",
        image="/var/lib/xnbd/c.cache",
        bitmap="/var/lib/xnbd/c.bitmap",
        control_socket="/run/xnbd-wrapper/exports/c.ctl",
        remote_host="origin.example.org",
        remote_port="8520",
        remote_export_name="remote disk",
    ),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_unit_config_gives_the_same_server_as_the_child(entry: ExportEntry, tmp_path: Path) -> None:
    got = from_file(entry, tmp_path)
    assert got == from_child_args(entry)
    assert got["exportname"] == entry.name
    assert got["handoff_socket"] == "/run/xnbd-wrapper/exports/export-0123.sock"


@settings(max_examples=50, deadline=None)
@given(
    name=names,
    description=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
)
def test_any_name_and_description_survive_the_file(name: str, description: str) -> None:
    import tempfile

    entry = ExportEntry(name=name, mode="target", image="/x.img", description=description)
    with tempfile.TemporaryDirectory() as tmp:
        got = from_file(entry, Path(tmp))
    assert got["exportname"] == name
    assert got["description"] == description


@pytest.mark.parametrize("field", ["description", "remote_host"])
def test_a_line_break_cannot_smuggle_in_a_key(field: str) -> None:
    entry = ExportEntry(
        name="p",
        mode="proxy",
        image="/c",
        bitmap="/b",
        control_socket="/s",
        remote_host="h",
        remote_port="1",
    )
    values = {field: "x\ncontrol-socket = /etc/evil"}
    with pytest.raises(UnitError, match="control characters"):
        export_config(ExportEntry(**{**entry.__dict__, **values}), "/h.sock")


def test_write_config_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "exports" / "alpha.conf"
    write_config(str(path), "mode = target\n")
    write_config(str(path), "mode = proxy\n")
    assert path.read_text() == "mode = proxy\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["alpha.conf"]  # no temporary file left behind


def test_a_value_the_server_rejects_is_a_config_error(tmp_path: Path) -> None:
    """A bad pass-through value (the original passes -Q unchanged) fails the unit with exit
    status 2, which the unit does not restart."""
    entry = ENTRIES[2]
    path = tmp_path / "bad.conf"
    write_config(str(path), export_config(entry, "/h.sock", max_queue_size="lots"))
    with pytest.raises(ConfigError, match="max-queue-size"):
        parse(["--config", str(path)])
