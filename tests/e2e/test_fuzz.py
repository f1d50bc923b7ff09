"""The fuzzer's short mode (docs/fuzzing.md): 8,000 hostile inputs per mode against the real
daemon -- target with a read-only guard export, cow-target, proxy over our own origin, and the
wrapper -- with liveness probes, guards and an RSS bound; any finding fails the test with the
seed and the server's log. The long mode is ``python -m tests.fuzz`` with a million inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests import rawnbd
from tests.fuzz import wire
from tests.fuzz.harness import MODES, unchanged
from tests.fuzz.runner import EXTENDED_REPLY_MAGIC, Finding, Replies, fuzz

pytestmark = pytest.mark.e2e

INPUTS = 8000


@pytest.mark.parametrize("mode", MODES)
def test_short_fuzz(tmp_path: Path, mode: str) -> None:
    stats = fuzz(mode, tmp_path, inputs=INPUTS, seed=15, probe_every=2000)
    assert not stats.findings, "\n".join(stats.findings)
    assert stats.inputs >= INPUTS
    assert stats.handshakes > INPUTS // 10 and stats.requests > INPUTS // 2
    assert stats.probes >= INPUTS // 2000


def test_the_checker_catches_what_it_must() -> None:
    """The fuzzer can fail: bad framing, a double answer, a write on a read-only export."""
    sent = {1: wire.Sent(rawnbd.CMD_READ, 4), 2: wire.Sent(rawnbd.CMD_WRITE, 4)}
    ok = Replies(dict(sent), readonly=True, extended=False)
    ok.feed(struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 0, 1) + b"data")
    assert ok.open == {2}
    for bad in (
        struct.pack("!IIQ", 0x12345678, 0, 1),  # bad magic
        struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 0, 7),  # a cookie never sent
        struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 0, 2),  # a WRITE accepted on a read-only export
    ):
        with pytest.raises(Finding):
            Replies(dict(sent), readonly=True, extended=False).feed(bad)
    twice = Replies(dict(sent), readonly=False, extended=False)
    twice.feed(struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 5, 1))
    with pytest.raises(Finding):
        twice.feed(struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 5, 1))


def test_the_checker_frames_extended_replies_and_nothing_else() -> None:
    """Once extended headers are negotiated only extended chunks may come; an extended
    chunk is framed by its 64-bit length, and before the negotiation it is a bad magic."""
    sent = {1: wire.Sent(rawnbd.CMD_READ, 4), 2: wire.Sent(rawnbd.CMD_FLUSH, 0)}
    data = struct.pack("!IHHQQQ", EXTENDED_REPLY_MAGIC, 1, 1, 1, 0, 12) + bytes(8) + b"data"
    ok = Replies(dict(sent), readonly=False, extended=True)
    ok.feed(data[:20])
    ok.feed(data[20:])
    assert ok.open == {2}
    error = struct.pack("!IHHQQQ", EXTENDED_REPLY_MAGIC, 1, 0x8001, 2, 0, 6) + bytes(6)
    with pytest.raises(Finding):  # an error chunk without an error
        Replies(dict(sent), readonly=False, extended=True).feed(error)
    for bad, extended in (
        (struct.pack("!IIQ", rawnbd.SIMPLE_MAGIC, 0, 2), True),
        (data, False),
    ):
        with pytest.raises(Finding):
            Replies(dict(sent), readonly=False, extended=extended).feed(bad)


def test_a_guard_notices_one_changed_byte(tmp_path: Path) -> None:
    image = tmp_path / "guarded.img"
    image.write_bytes(bytes(8192))
    guard = unchanged(image)
    assert guard() == ""
    with open(image, "r+b") as f:
        f.seek(5000)
        f.write(b"\x01")
    assert guard() != ""
