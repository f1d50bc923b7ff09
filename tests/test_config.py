"""xnbdd.config: the instance configuration format, its types, and errors that name file and key."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xnbdd.config import KEYS, Config, ConfigError, Mode, load, load_config, parse_size

EXAMPLE = Path(__file__).resolve().parents[1] / "etc" / "xnbd" / "example.conf"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "disk.conf"
    path.write_text(text)
    return str(path)


def test_every_key_and_type(tmp_path: Path) -> None:
    conf = write(
        tmp_path,
        """
# a comment
   # an indented comment

mode = proxy
cache-image = /srv/xnbd/disk.img
readonly = yes
lport = 10809
laddr = 127.0.0.1, ::1  192.0.2.1
unix = /run/xnbd/disk/nbd.sock
exportname = disk
description = "  spaces # kept  "
oldstyle = off
max-queue-size = 0x40
max_buf_size = 1048576
cow-dir = /var/lib/xnbd/cow
logpath = /var/log/xnbd/disk.log
syslog = true
remote-host = origin.example.org
remote-port = 8520
cache-bitmap = /var/lib/xnbd/c.bitmap
control-socket = /run/xnbd/disk/control.sock
target-exportname = upstream
clear-bitmap = 1
""",
    )
    assert load_config(conf) == {
        "mode": "proxy",
        "cache_image": "/srv/xnbd/disk.img",
        "readonly": True,
        "lport": 10809,
        "laddr": ["127.0.0.1", "::1", "192.0.2.1"],
        "unix": "/run/xnbd/disk/nbd.sock",
        "exportname": "disk",
        "description": "  spaces # kept  ",
        "oldstyle": False,
        "max_queue_size": 64,
        "max_buf_size": 1048576,
        "cow_dir": "/var/lib/xnbd/cow",
        "logpath": "/var/log/xnbd/disk.log",
        "syslog": True,
        "remote_host": "origin.example.org",
        "remote_port": 8520,
        "cache_bitmap": "/var/lib/xnbd/c.bitmap",
        "control_socket": "/run/xnbd/disk/control.sock",
        "target_exportname": "upstream",
        "clear_bitmap": True,
    }


@pytest.mark.parametrize(
    ("written", "dest"),
    [("cow-target", "cow_target"), ("cow_target", "cow_target"), ("Target", "target")],
)
def test_mode_spellings(tmp_path: Path, written: str, dest: str) -> None:
    assert load_config(write(tmp_path, f"mode = {written}\n")) == {"mode": dest}


def test_empty_file_gives_nothing(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "\n# only comments\n")) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lport = abc", "key 'lport': not a port number: 'abc'"),
        ("lport = 70000", "key 'lport': not a port number: '70000'"),
        ("lport = 0", "key 'lport': not a port number: '0'"),
        ("remote-port = -1", "key 'remote-port': not a port number: '-1'"),
        (
            "readonly = maybe",
            "key 'readonly': not a boolean (yes/no, true/false, on/off, 1/0): 'maybe'",
        ),
        ("mode = mirror", "key 'mode': not one of target, cow-target, proxy: 'mirror'"),
        ("image = disk.img", "key 'image': path must be absolute: 'disk.img'"),
        ("image =", "key 'image': path must be absolute: ''"),
        ("exportname = ", "key 'exportname': empty: ''"),
        ("max-queue-size = lots", "key 'max-queue-size': not a number: 'lots'"),
        ("max-buf-size = -5", "key 'max-buf-size': must not be negative: '-5'"),
        ("laddr = ,", "key 'laddr': empty: ','"),
        (
            "image = /a\ncache-image = /b",
            "key 'cache-image': the proxy's image is already set by 'image'",
        ),
        ("target = /srv/disk.img", "key 'target': unknown key"),
        ("lport = 1\nlport = 2", "key 'lport': given more than once"),
        ("lport = 1\nlport_ = 2", "key 'lport_': unknown key"),
        ("max_buf_size = 1\nmax-buf-size = 2", "key 'max-buf-size': given more than once"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    conf = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(conf)
    assert str(caught.value) == f"{conf}: {message}"


def test_line_without_equals(tmp_path: Path) -> None:
    conf = write(tmp_path, "mode = target\nreadonly\n")
    with pytest.raises(ConfigError, match=re.escape(f"{conf}:2: expected 'key = value', got")):
        load_config(conf)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read: No such file")):
        load_config(missing)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read")):
        load_config(str(tmp_path))  # a directory


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.conf"
    path.write_bytes(b"image = /\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))


def test_example_file_parses_and_documents_every_key() -> None:
    values = load_config(str(EXAMPLE))
    assert values["mode"] == "target" and values["lport"] == 8520
    text = EXAMPLE.read_text()
    for key in KEYS:
        assert re.search(rf"^#?{re.escape(key)} = ", text, re.M), f"{key} not in the example"


def test_commented_example_lines_are_valid_when_enabled(tmp_path: Path) -> None:
    """Uncommenting any example line must give a valid file (the examples are not stale)."""
    lines = EXAMPLE.read_text().splitlines()
    enabled = [line[1:] if re.match(r"#[a-z-]+ = ", line) else line for line in lines]
    # image (target) and cache-image (proxy) exclude each other: enable the proxy's.
    enabled = [line for line in enabled if not line.startswith("image = ")]
    values = load_config(write(tmp_path, "\n".join(enabled) + "\n"))
    assert set(values) == {dest for dest, _ in KEYS.values()} - {"image"}


@given(st.integers(min_value=1, max_value=65535), st.sampled_from([" ", "\t", ""]))
def test_any_port_with_any_blanks(port: int, blank: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write(f"{blank}lport{blank}={blank}{port}{blank}\n")
    try:
        assert load_config(f.name) == {"lport": port}
    finally:
        os.unlink(f.name)


def test_every_key_reaches_the_command_line_parser(tmp_path: Path) -> None:
    """The values land under dest names xnbd-server's parser knows, and the file only supplies
    defaults: a flag given on the command line wins."""
    from xnbdd.cli.server import POSITIONALS, build_parser, parse

    known = {action.dest for action in build_parser()._actions}
    known |= {name for names in POSITIONALS.values() for name in names}
    known.add("cache_image")  # parse() turns it into the proxy's image, checked below
    assert {dest for dest, _ in KEYS.values()} <= known

    conf = write(
        tmp_path, "mode = target\nimage = /srv/xnbd/a.img\nlport = 10809\nreadonly = yes\n"
    )
    settings = parse(["--config", conf, "--lport", "10810"])
    assert settings.mode == "target" and settings.image == "/srv/xnbd/a.img"
    assert settings.readonly is True
    assert settings.lport == 10810

    proxy = write(
        tmp_path,
        "mode = proxy\nremote-host = origin\nremote-port = 8520\ncache-image = /srv/xnbd/c.img\n"
        "cache-bitmap = /srv/xnbd/c.bitmap\ncontrol-socket = /run/xnbd/p/control.sock\n",
    )
    settings = parse(["--config", proxy])
    assert settings.image == "/srv/xnbd/c.img" and settings.remote_port == 8520


def test_timeouts_are_positive_seconds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "remote-timeout = 2.5\nhandshake-timeout = 10\n"))
    assert config == {"remote_timeout": 2.5, "handshake_timeout": 10.0}
    with pytest.raises(ConfigError, match="key 'remote-timeout'"):
        load_config(write(tmp_path, "remote-timeout = 0\n"))


def test_sizes_take_binary_suffixes() -> None:
    assert [parse_size(t) for t in ("8M", "512KiB", "1.5G", "16MB", "4096", "0x10")] == [
        8 << 20,
        512 << 10,
        3 << 29,
        16 << 20,
        4096,
        16,
    ]
    for bad in ("M", "-1", "8Q", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_load_types_the_values_and_keeps_what_the_file_set(tmp_path: Path) -> None:
    config = load(write(tmp_path, "mode = cow-target\nladdr = ::1, 127.0.0.1\nlport = 10810\n"))
    assert config.mode is Mode.COW_TARGET and config.lport == 10810
    assert config.laddr == ("::1", "127.0.0.1")
    assert config.given == {"mode", "laddr", "lport"}
    assert config.values() == {"mode": "cow_target", "laddr": ("::1", "127.0.0.1"), "lport": 10810}
    assert config.readonly is False and config.handshake_timeout == 30.0  # defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lport = 1  # type: ignore[misc]


def test_every_key_is_a_typed_field() -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    assert {dest for dest, _ in KEYS.values()} <= fields
    # Every example value lands in its field (a key without one would fail in load()).
    assert load(str(EXAMPLE)).given <= fields
