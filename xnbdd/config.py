"""Instance configuration files, /etc/xnbd/<instance>.conf, read into xnbd-server option values.

Format (documented for administrators in etc/xnbd/example.conf):

    # comment lines start with '#' (after optional blanks); blank lines are ignored
    mode = target
    image = /var/lib/xnbd/disk.img
    max-queue-size = 64

One `key = value` per line. Keys are xnbd-server's long option names without the dashes in front
(`max-queue-size`; `max_queue_size` is accepted too); each key at most once. Values run to the
end of the line, surrounding blanks removed; double quotes around a value are removed, so a
description can keep blanks at its ends. Booleans are yes/no, true/false, on/off or 1/0;
numbers are decimal or 0x-hexadecimal; paths must be absolute (a unit's working directory is /);
`laddr` takes one or more addresses separated by blanks or commas. In proxy mode the local cache
image (xnbd-server's CACHE_DISK argument) is `cache-image`; `image` is accepted for it too, but
not both.

load() returns a frozen Config: one typed field per key, under xnbd-server's argparse dest names,
with the defaults xnbd-server uses; ``given`` names the keys the file set, so the command line
parser can overlay its flags (they win) and a reload can tell what the file says from a default.
load_config() is the parsing step alone: the given values as a dict. Every error names the file
and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .proto.consts import DEFAULT_PORT

__all__ = ["KEYS", "Config", "ConfigError", "Mode", "load", "load_config"]


class Mode(StrEnum):
    """What xnbd-server serves; the value is the argparse/configuration spelling."""

    TARGET = "target"
    COW_TARGET = "cow_target"
    PROXY = "proxy"

    @property
    def flag(self) -> str:
        return "--" + self.value.replace("_", "-")


class ConfigError(Exception):
    """A configuration file cannot be used; the message names the file (and the key)."""


Parser = Callable[[str], object]

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_MODES = {
    "target": Mode.TARGET,
    "cow-target": Mode.COW_TARGET,
    "cow_target": Mode.COW_TARGET,
    "proxy": Mode.PROXY,
}


def _boolean(text: str) -> bool:
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean (yes/no, true/false, on/off, 1/0)")


def _count(text: str) -> int:
    try:
        value = int(text, 0)  # 0x.. accepted like the original's option parser
    except ValueError:
        raise ValueError("not a number") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count: an integer (0x.. accepted) or a number with a binary suffix K, M, G or T
    (``8M``, ``512KiB``, ``1.5G``). ValueError with a short reason otherwise."""
    word = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = word[-1:] if word[-1:] in _SIZE_SUFFIXES else ""
    number = word[: len(word) - len(suffix)]
    if not suffix:
        return _count(text)
    try:
        value = float(number)
    except ValueError:
        raise ValueError("not a size (a number, optionally with K, M, G or T)") from None
    if value < 0:
        raise ValueError("must not be negative")
    return int(value * _SIZE_SUFFIXES[suffix])


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError("not a port number") from None
    if not 1 <= value <= 65535:
        raise ValueError("not a port number")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _mode(text: str) -> Mode:
    try:
        return _MODES[text.lower()]
    except KeyError:
        raise ValueError("not one of target, cow-target, proxy") from None


def _text(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("path must be absolute")
    return text


def _image(text: str) -> str:
    """An absolute path, or a Ceph RBD image ``rbd:POOL/IMAGE[@SNAP]`` (docs/rbd.md)."""
    return text if text.startswith("rbd:") else _path(text)


def _tls_mode(text: str) -> str:
    word = text.lower()
    if word not in ("off", "on", "require"):
        raise ValueError("not one of off, on, require")
    return word


def _addresses(text: str) -> list[str]:
    addresses = [a for a in text.replace(",", " ").split() if a]
    if not addresses:
        raise ValueError("empty")
    return addresses


# key as written in the file -> (argparse dest, value parser)
KEYS: dict[str, tuple[str, Parser]] = {
    "mode": ("mode", _mode),
    "image": ("image", _image),
    "readonly": ("readonly", _boolean),
    "lport": ("lport", _port),
    "laddr": ("laddr", _addresses),
    "unix": ("unix", _path),
    "exportname": ("exportname", _text),
    "description": ("description", _text),
    "oldstyle": ("oldstyle", _boolean),
    "max-queue-size": ("max_queue_size", _count),
    "max-buf-size": ("max_buf_size", parse_size),
    "max-clients": ("max_clients", _count),
    "workers": ("workers", _count),
    "snapshot-rate": ("snapshot_rate", parse_size),
    "cow-dir": ("cow_dir", _path),
    "logpath": ("logpath", _path),
    "syslog": ("syslog", _boolean),
    "remote-host": ("remote_host", _text),
    "remote-port": ("remote_port", _port),
    "cache-image": ("cache_image", _image),
    "cache-bitmap": ("cache_bitmap", _path),
    "control-socket": ("control_socket", _path),
    "target-exportname": ("target_exportname", _text),
    "clear-bitmap": ("clear_bitmap", _boolean),
    "remote-timeout": ("remote_timeout", _seconds),
    "handshake-timeout": ("handshake_timeout", _seconds),
    "handoff-socket": ("handoff_socket", _path),  # written by xnbd-wrapper --systemd-units
    "tls": ("tls", _tls_mode),
    "tls-certificates": ("tls_certificates", _path),
    "tls-verify-peer": ("tls_verify_peer", _boolean),
    "tls-psk": ("tls_psk", _path),
    "remote-tls": ("remote_tls", _boolean),
    "remote-tls-ca": ("remote_tls_ca", _path),
    "remote-tls-cert": ("remote_tls_cert", _path),
    "remote-tls-key": ("remote_tls_key", _path),
    "pid-file": ("pid_file", _path),
    "rotational": ("rotational", _boolean),
    "rbd-conf": ("rbd_conf", _path),
    "rbd-id": ("rbd_id", _text),
    "rbd-keyring": ("rbd_keyring", _path),
}


def load_config(path: str) -> dict[str, object]:
    """Parse the file at path; raises ConfigError for anything it cannot use."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None

    values: dict[str, object] = {}
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{number}: expected 'key = value', got {raw.strip()!r}")
        name = key.replace("_", "-")
        if name not in KEYS:
            raise ConfigError(f"{path}: key {key!r}: unknown key")
        if name in seen:
            raise ConfigError(f"{path}: key {key!r}: given more than once")
        seen.add(name)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        dest, parse = KEYS[name]
        try:
            values[dest] = parse(value)
        except ValueError as e:
            raise ConfigError(f"{path}: key {key!r}: {e}: {value!r}") from None
    if "image" in values and "cache_image" in values:
        raise ConfigError(f"{path}: key 'cache-image': the proxy's image is already set by 'image'")
    return values


@dataclass(frozen=True)
class Config:
    """An instance configuration: every key of KEYS by its dest name, typed, with the default
    xnbd-server uses when neither the file nor the command line sets it."""

    mode: Mode | None = None
    image: str | None = None
    readonly: bool = False
    lport: int = DEFAULT_PORT
    laddr: tuple[str, ...] = ()
    unix: str | None = None
    exportname: str | None = None
    description: str = ""
    oldstyle: bool = False
    max_queue_size: int = 0  # 0: the built-in default (budget.py)
    max_buf_size: int = 0
    max_clients: int = 0  # 0: no limit
    workers: int | None = None  # data-plane processes; None: one per CPU (workers.py), 0: none
    snapshot_rate: int = 0  # bytes per second of a background snapshot copy (0: no limit)
    cow_dir: str | None = None
    logpath: str | None = None
    syslog: bool = False
    remote_host: str | None = None
    # a port number from the file; REMOTE_PORT from the command line stays text (a unix origin
    # ignores it, remote.py)
    remote_port: int | str | None = None
    cache_image: str | None = None
    cache_bitmap: str | None = None
    control_socket: str | None = None
    target_exportname: str | None = None
    clear_bitmap: bool = False
    remote_timeout: float = 30.0
    handshake_timeout: float = 30.0
    handoff_socket: str | None = None
    tls: str = "off"
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    tls_psk: str | None = None
    remote_tls: bool = False
    remote_tls_ca: str | None = None
    remote_tls_cert: str | None = None
    remote_tls_key: str | None = None
    pid_file: str | None = None
    rotational: bool | None = None  # None: as the image's device says (rotational.py)
    rbd_conf: str | None = None
    rbd_id: str | None = None
    rbd_keyring: str | None = None
    given: frozenset[str] = frozenset()  # dest names the file set

    @classmethod
    def from_values(cls, values: dict[str, object]) -> Config:
        """A Config from load_config()'s dict (dest name -> parsed value)."""
        fields: dict[str, Any] = dict(values)
        laddr = fields.get("laddr")
        if isinstance(laddr, list):
            fields["laddr"] = tuple(laddr)
        return dataclasses.replace(cls(), given=frozenset(values), **fields)

    def values(self) -> dict[str, object]:
        """What the file set, by dest name (as load_config() returns it)."""
        return {key: getattr(self, key) for key in sorted(self.given)}


def load(path: str) -> Config:
    """The file at path as a Config; raises ConfigError for anything it cannot use."""
    return Config.from_values(load_config(path))
