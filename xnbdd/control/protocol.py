"""The control socket protocol, version 1: line-delimited JSON (pure, stdlib only).

Every message is one JSON object on one line (UTF-8, ``\\n``-terminated, at most 64 KiB). The
client sends requests, one at a time on a connection; the server answers each with zero or more
event lines followed by exactly one final line::

    request  {"v": 1, "cmd": "query"}
    request  {"v": 1, "cmd": "cache-all", "blocks_per_request": 31, "progress": true}
    request  {"v": 1, "cmd": "switch", "force": false}
    request  {"v": 1, "cmd": "reconnect", "host": "h", "port": "8520", "exportname": null}
    request  {"v": 1, "cmd": "snapshot"}
    event    {"event": "progress", "cached": 1200, "total": 16384}
    final    {"ok": true, "result": {...}}
    final    {"ok": false, "error": "human readable reason"}

A request that cannot be understood (bad JSON, unknown ``cmd`` or version, wrong argument types)
gets ``{"ok": false, ...}`` and the connection stays usable. The byte order of everything is
JSON's own, so the protocol does not depend on the host (docs/decisions.md D23).
"""

from __future__ import annotations

from .. import jsonline

TYPE_CHECKING = False  # not typing's: importing typing costs xnbd-bgctl's start 2 ms
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_LINE = jsonline.MAX_LINE

COMMANDS: dict[str, dict[str, tuple[type, ...]]] = {
    # command -> argument name -> accepted JSON types (all arguments optional unless below)
    "query": {},
    "cache-all": {"blocks_per_request": (int,), "progress": (bool,)},
    "switch": {"force": (bool,)},
    "reconnect": {"host": (str,), "port": (str, int), "exportname": (str, type(None))},
    "snapshot": {},
}
REQUIRED = {"reconnect": ("host", "port")}


class ControlError(jsonline.LineError):
    """A request or message that breaks this protocol; its text goes into the error reply."""


class Request:
    """A validated request: its command and arguments. A plain class, not a dataclass:
    importing dataclasses costs xnbd-bgctl 6 ms of its start, which cache-all counts."""

    __slots__ = ("args", "cmd")

    def __init__(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        self.cmd = cmd
        self.args = {} if args is None else args

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and (self.cmd, self.args) == (other.cmd, other.args)

    def __repr__(self) -> str:
        return f"Request({self.cmd!r}, {self.args!r})"


def encode(message: dict[str, Any]) -> bytes:
    return jsonline.encode(message, ControlError)


def request(cmd: str, **args: Any) -> bytes:
    return encode({"v": VERSION, "cmd": cmd, **args})


def ok(result: dict[str, Any] | None = None) -> bytes:
    return encode({"ok": True, "result": result or {}})


def error(message: str) -> bytes:
    return encode({"ok": False, "error": message})


def event(name: str, **fields: Any) -> bytes:
    return encode({"event": name, **fields})


def decode(line: bytes) -> dict[str, Any]:
    return jsonline.decode(line, ControlError)


def parse_request(line: bytes) -> Request:
    """Validate one request line (without its newline)."""
    message = decode(line)
    version = message.pop("v", None)
    if version != VERSION:
        raise ControlError(f"unsupported protocol version {version!r} (this server speaks 1)")
    cmd = message.pop("cmd", None)
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    spec = COMMANDS[cmd]
    for name, value in message.items():
        if name not in spec:
            raise ControlError(f"{cmd}: unknown argument {name!r}")
        # bool is an int in Python: do not let true pass as a number
        if not isinstance(value, spec[name]) or (
            isinstance(value, bool) and bool not in spec[name]
        ):
            raise ControlError(f"{cmd}: argument {name!r} has the wrong type")
    for name in REQUIRED.get(cmd, ()):
        if name not in message:
            raise ControlError(f"{cmd}: argument {name!r} is required")
    return Request(cmd, message)


class LineBuffer(jsonline.LineBuffer):
    """Split a byte stream into lines; a line longer than MAX_LINE is a ControlError."""

    def __init__(self) -> None:
        super().__init__(ControlError)
