"""The option framer that lets the wrapper fetch export information before the handshake
machine needs it."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from xnbdd.proto.consts import IHAVEOPT, Opt
from xnbdd.proto.handshake import MAX_OPTION_DATA
from xnbdd.wrapper.frontend import OptionFramer, option_export_name


def option(opt: int, data: bytes) -> bytes:
    return struct.pack("!QII", IHAVEOPT, opt, len(data)) + data


def go(name: str) -> bytes:
    raw = name.encode()
    return option(Opt.GO, struct.pack("!I", len(raw)) + raw + struct.pack("!H", 0))


STREAM = (
    b"\0\0\0\3"
    + option(Opt.STRUCTURED_REPLY, b"")
    + go("disk")
    + option(Opt.EXPORT_NAME, b"other")
    + b"\x25\x60\x95\x13rest"
)


def pieces(framer: OptionFramer) -> list[tuple[bytes, int | None, bytes]]:
    out = []
    while (piece := framer.next_piece()) is not None:
        out.append(piece)
    return out


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=8))
def test_any_chunking_yields_the_same_whole_options(cuts: list[int]) -> None:
    framer = OptionFramer()
    got = []
    start = 0
    for cut in [*sorted(set(cuts)), len(STREAM)]:
        framer.buffer += STREAM[start:cut]
        start = cut
        got += pieces(framer)
    # flags, then three whole options; trailing bytes after the last option stay buffered
    # (after EXPORT_NAME they are the first request, handed over as pending bytes)
    assert [opt for _, opt, _ in got[:4]] == [None, Opt.STRUCTURED_REPLY, Opt.GO, Opt.EXPORT_NAME]
    assert b"".join(raw for raw, _, _ in got[:4]) == STREAM[: len(STREAM) - 8]
    named = [(opt, data) for _, opt, data in got[2:4] if opt is not None]
    assert [option_export_name(opt, data) for opt, data in named] == ["disk", "other"]


def test_oversized_option_passes_through_in_pieces() -> None:
    framer = OptionFramer()
    framer.buffer += b"\0\0\0\1" + struct.pack("!QII", IHAVEOPT, 99, MAX_OPTION_DATA + 1)
    framer.buffer += b"x" * 1000
    got = pieces(framer)
    assert [opt for _, opt, _ in got] == [None, None, None]
    assert framer.skipping == MAX_OPTION_DATA + 1 - 1000


def test_malformed_names_are_left_to_the_machine() -> None:
    assert option_export_name(Opt.GO, b"\0\0") is None
    assert option_export_name(Opt.EXPORT_NAME, b"\xff") is None
