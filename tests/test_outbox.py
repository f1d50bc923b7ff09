"""The reply queue (``xnbdd/outbox.py``) over a real socket pair: a reply's cost comes back only
when its last byte is out, through writev batches larger than IOV_MAX and sendfile parts."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnbdd.backends.base import FileRange
from xnbdd.outbox import MAX_IOV, ClosedConnection, Outbox, Reads
from xnbdd.proto.consts import SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC
from xnbdd.proto.wire import OFFSET_DATA, SIMPLE_REPLY
from xnbdd.tls import PlainTransport


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with ours, theirs:
        yield ours, theirs


def drain(sock: socket.socket, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        chunk = sock.recv(want - len(got))
        assert chunk, "the other end closed early"
        got += chunk
    return bytes(got)


def test_cost_comes_back_when_the_last_byte_is_out(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    outbox = Outbox(PlainTransport(ours.fileno()), {})
    big = os.urandom(1 << 20)  # far more than the socket takes at once
    outbox.add_data(b"H" * 16, big, cost=7)
    outbox.add([b"tail"], cost=3)
    count, cost = outbox.send()
    assert (count, cost) == (0, 0)  # the socket is full before the first reply is whole
    assert outbox.parts
    received = bytearray()
    while outbox.parts:
        received += theirs.recv(1 << 16)
        sent, returned = outbox.send()
        count, cost = count + sent, cost + returned
    received += drain(theirs, 16 + len(big) + 4 - len(received))
    assert bytes(received) == b"H" * 16 + big + b"tail"
    assert (count, cost) == (2, 10)


def test_more_parts_than_one_writev_takes(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    outbox = Outbox(PlainTransport(ours.fileno()), {})
    replies = MAX_IOV * 2 + 5
    for n in range(replies):
        outbox.add_simple(n, 0, cost=1)
    count, cost = outbox.send()
    assert not outbox.parts
    assert (count, cost) == (replies, replies)
    assert len(drain(theirs, 16 * replies)) == 16 * replies


def test_sendfile_parts_between_byte_parts(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    image = tmp_path / "image"
    data = os.urandom(64 * 1024)
    image.write_bytes(data)
    fd = os.open(image, os.O_RDONLY)
    try:
        outbox = Outbox(PlainTransport(ours.fileno()), {})
        outbox.add_data(b"head", FileRange(fd, 4096, 8192), cost=8192)
        outbox.add([b"next"], cost=0)
        while outbox.parts:
            outbox.send()
        assert drain(theirs, 4 + 8192 + 4) == b"head" + data[4096 : 4096 + 8192] + b"next"
    finally:
        os.close(fd)


def test_a_shrunken_file_ends_the_connection(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, _theirs = pair
    image = tmp_path / "image"
    image.write_bytes(b"x" * 4096)
    fd = os.open(image, os.O_RDONLY)
    try:
        outbox = Outbox(PlainTransport(ours.fileno()), {})
        outbox.add_data(b"head", FileRange(fd, 8192, 4096), cost=4096)  # past the end
        with pytest.raises(ClosedConnection, match="image ended"):
            outbox.send()
    finally:
        os.close(fd)


def test_a_pass_queued_in_one_go_comes_back_whole_and_in_order(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    """The plane's inline answers of one pass (``add_reads_*``, ``add_oks_*``) share one mark:
    their cost comes back once the last of them is out, through partial writes and a sendfile
    part, and a reply added alone after them keeps its own."""
    ours, theirs = pair
    image = tmp_path / "image"
    image.write_bytes(os.urandom(256 * 1024))
    fd = os.open(image, os.O_RDONLY)
    try:
        outbox = Outbox(PlainTransport(ours.fileno()), {})
        blocks = [os.urandom(4096) for _ in range(40)]  # 160 KiB: far more than one write takes
        reads: Reads = [(n, n * 4096, 4096, block) for n, block in enumerate(blocks)]
        reads.append((99, 8192, 65536, FileRange(fd, 8192, 65536)))
        outbox.add_reads_chunk(reads, cost=40 * 4096 + 65536)
        outbox.add_oks_simple([(100, 0), (101, 4096)], cost=0)
        outbox.add([SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 102)], cost=5)  # an event loop's
        expected = bytearray()
        for n, block in enumerate(blocks):
            expected += OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, 1, 1, n, 8 + 4096, n * 4096)
            expected += block
        expected += OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, 1, 1, 99, 8 + 65536, 8192)
        expected += image.read_bytes()[8192 : 8192 + 65536]
        for cookie in (100, 101, 102):
            expected += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        returned: list[tuple[int, int]] = []
        received = bytearray()
        while outbox.parts:
            sent = outbox.send()
            if sent[0]:
                returned.append(sent)
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(1 << 16, socket.MSG_DONTWAIT)
        received += drain(theirs, len(expected) - len(received))
        assert bytes(received) == bytes(expected)
        # the pass (41 READs and 2 WRITEs) as one, never a part of it; the last reply alone
        assert sum(count for count, _ in returned) == 44
        assert sum(cost for _, cost in returned) == 40 * 4096 + 65536 + 5
        assert returned[0] in ((43, 40 * 4096 + 65536), (44, 40 * 4096 + 65536 + 5))
    finally:
        os.close(fd)


def test_an_open_pass_counts_once_whether_it_goes_at_once_or_in_pieces(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A pass's replies with no reply queued after them (no mark of their own yet) come back
    in the count when they went whole: with the replies before them in one ``writev``, and on
    their own when the socket took them in pieces."""
    ours, theirs = pair
    outbox = Outbox(PlainTransport(ours.fileno()), {})
    outbox.add([SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 1)], cost=5)
    outbox.add_oks_simple([(2, 0), (3, 4096)], cost=7)
    assert outbox.send() == (3, 12)  # a few bytes: the socket takes them at once
    assert drain(theirs, 3 * SIMPLE_REPLY.size)
    blocks = [os.urandom(4096) for _ in range(8)]  # more than the socket takes at once
    outbox.add_reads_chunk([(n, 0, 4096, block) for n, block in enumerate(blocks)], cost=11)
    returned = outbox.send()
    assert returned == (0, 0) and outbox.parts
    want = len(blocks) * (OFFSET_DATA.size + 4096)
    received = bytearray()
    while outbox.parts:
        received += theirs.recv(1 << 16)
        sent = outbox.send()
        returned = (returned[0] + sent[0], returned[1] + sent[1])
    received += drain(theirs, want - len(received))
    assert len(received) == want and returned == (8, 11)
    assert outbox.send() == (0, 0)  # nothing counted twice
