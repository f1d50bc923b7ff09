"""The control protocol's framing and request validation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xnbdd.control.protocol import (
    MAX_LINE,
    ControlError,
    LineBuffer,
    Request,
    error,
    event,
    ok,
    parse_request,
    request,
)


def test_round_trip_of_every_command() -> None:
    assert parse_request(request("query").rstrip(b"\n")) == Request("query", {})
    line = request("reconnect", host="h", port=10809, exportname=None).rstrip(b"\n")
    assert parse_request(line) == Request(
        "reconnect", {"host": "h", "port": 10809, "exportname": None}
    )
    line = request("cache-all", blocks_per_request=8, progress=True).rstrip(b"\n")
    assert parse_request(line).args == {"blocks_per_request": 8, "progress": True}
    assert json.loads(ok({"a": 1})) == {"ok": True, "result": {"a": 1}}
    assert json.loads(error("no")) == {"ok": False, "error": "no"}
    assert json.loads(event("progress", cached=1, total=2))["event"] == "progress"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"cmd": "query"}', "version"),
        (b'{"v": 2, "cmd": "query"}', "version"),
        (b'{"v": 1, "cmd": "format-disk"}', "unknown command"),
        (b'{"v": 1, "cmd": "switch", "force": 1}', "wrong type"),
        (b'{"v": 1, "cmd": "cache-all", "blocks_per_request": true}', "wrong type"),
        (b'{"v": 1, "cmd": "query", "extra": 1}', "unknown argument"),
        (b'{"v": 1, "cmd": "reconnect", "host": "x"}', "required"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_requests_are_explained(line: bytes, reason: str) -> None:
    with pytest.raises(ControlError, match=reason):
        parse_request(line)


@given(st.lists(st.integers(min_value=1, max_value=20), max_size=50))
def test_lines_survive_any_split(splits: list[int]) -> None:
    stream = b"".join(request("switch", force=bool(i % 2)) for i in range(5))
    buffer = LineBuffer()
    lines: list[bytes] = []
    pos = 0
    for size in splits:
        lines += buffer.feed(stream[pos : pos + size])
        pos += size
    lines += buffer.feed(stream[pos:])
    assert [parse_request(x).args["force"] for x in lines] == [False, True, False, True, False]


def test_overlong_line_is_refused_and_the_buffer_recovers() -> None:
    buffer = LineBuffer()
    with pytest.raises(ControlError):
        buffer.feed(b"x" * (MAX_LINE + 1))
    assert buffer.feed(b"{}\n") == [b"{}"]
