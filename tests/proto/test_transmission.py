"""Request framing and validation, by Hypothesis over every command x flag combination."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.proto.consts import REQUEST_MAGIC, Cmd, CmdFlag, Errno, TxFlag
from xnbdd.proto.errors import ProtocolError, RequestError
from xnbdd.proto.messages import Request
from xnbdd.proto.transmission import DRAIN_LIMIT, RequestDecoder, check_request

ALL_TX = TxFlag(sum(TxFlag))
SIZE = 1 << 20


def encode(req: Request) -> bytes:
    head = struct.pack(
        "!IHHQQI", REQUEST_MAGIC, req.flags, req.cmd, req.cookie, req.offset, req.length
    )
    return head + (req.data or b"")


requests = st.builds(
    lambda cmd, flags, cookie, offset, length: Request(
        cookie, cmd, flags, offset, length, bytes(length) if cmd == Cmd.WRITE else None
    ),
    cmd=st.integers(0, 9),
    flags=st.integers(0, 0xFFFF),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 5000),
)


@given(st.lists(requests, max_size=20), st.lists(st.integers(1, 3000), max_size=50))
def test_decoder_yields_the_requests_sent_however_split(
    sent: list[Request], cuts: list[int]
) -> None:
    stream = b"".join(encode(r) for r in sent)
    decoder = RequestDecoder()
    got: list[Request] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        decoder.receive_data(stream[pos : pos + cut])
        pos += cut
        while (req := decoder.next_request()) is not None:
            got.append(req)
    assert got == sent
    assert decoder.buffered == 0


def test_bad_magic_is_a_protocol_error() -> None:
    decoder = RequestDecoder()
    decoder.receive_data(struct.pack("!IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    with pytest.raises(ProtocolError):
        decoder.next_request()


def test_oversized_write_is_reported_then_drained_piecewise() -> None:
    decoder = RequestDecoder(max_payload=1024)
    big = Request(1, Cmd.WRITE, 0, 0, 5000, b"\xaa" * 5000)
    follow = Request(2, Cmd.READ, 0, 0, 16)
    stream = encode(big) + encode(follow)
    decoder.receive_data(stream[:100])
    first = decoder.next_request()
    assert first is not None and first.data is None and first.length == 5000
    for pos in range(100, len(stream), 700):
        decoder.receive_data(stream[pos : pos + 700])
    assert decoder.next_request() == follow


def test_denial_of_service_write_closes() -> None:
    decoder = RequestDecoder()
    decoder.receive_data(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, DRAIN_LIMIT + 1))
    with pytest.raises(ProtocolError):
        decoder.next_request()


ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
    Cmd.DISC: CmdFlag.FUA,
}


@settings(max_examples=1000)
@given(
    cmd=st.integers(0, 12),
    flags=st.integers(0, 0xFFFF),
    offset=st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
    readonly=st.booleans(),
    structured=st.booleans(),
)
def test_validation_follows_the_spec(
    cmd: int, flags: int, offset: int, length: int, readonly: bool, structured: bool
) -> None:
    tx = ALL_TX & ~TxFlag.READ_ONLY
    if readonly:
        tx |= TxFlag.READ_ONLY
    req = Request(1, cmd, flags, offset, length)
    errno: Errno | None
    try:
        check_request(req, size=SIZE, tx_flags=tx, structured=structured, has_contexts=True)
    except RequestError as err:
        errno = err.errno
    else:
        errno = None
    if cmd not in ALLOWED:
        assert errno is Errno.EINVAL
        return
    command = Cmd(cmd)
    allowed = int(ALLOWED[command])
    if not structured:
        allowed &= ~int(CmdFlag.DF)
    if flags & ~allowed:
        assert errno is Errno.EINVAL
    elif readonly and command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert errno is Errno.EPERM
    elif command is Cmd.FLUSH:
        assert errno is (Errno.EINVAL if offset or length else None)
    elif command is Cmd.DISC:
        assert errno is None
    elif command in (Cmd.READ, Cmd.WRITE) and length > 32 * 1024 * 1024:
        assert errno is Errno.EINVAL
    elif offset + length > SIZE:
        want = Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        assert errno is want
    elif command is Cmd.BLOCK_STATUS and length == 0:
        assert errno is Errno.EINVAL
    else:
        assert errno is None


def test_commands_not_advertised_are_refused() -> None:
    for cmd, flag in [
        (Cmd.TRIM, TxFlag.SEND_TRIM),
        (Cmd.CACHE, TxFlag.SEND_CACHE),
        (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES),
        (Cmd.FLUSH, TxFlag.SEND_FLUSH),
    ]:
        with pytest.raises(RequestError) as info:
            check_request(
                Request(1, cmd, 0, 0, 0),
                size=SIZE,
                tx_flags=ALL_TX & ~flag,
                structured=False,
                has_contexts=False,
            )
        assert info.value.errno is Errno.EINVAL


def test_block_status_needs_a_selected_context() -> None:
    with pytest.raises(RequestError):
        check_request(
            Request(1, Cmd.BLOCK_STATUS, 0, 0, 512),
            size=SIZE,
            tx_flags=ALL_TX,
            structured=True,
            has_contexts=False,
        )


def test_proto_package_never_imports_trio() -> None:
    code = (
        "import importlib, pkgutil, sys, xnbdd.proto as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('xnbdd.proto.' + m.name)\n"
        "assert len(list(pkgutil.iter_modules(p.__path__))) >= 5\n"
        "sys.exit('trio' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@given(st.integers(1, 4000), st.integers(0, 27 + 3999))
def test_direct_payload_receives_a_write_without_the_stream_buffer(
    length: int, arrived: int
) -> None:
    payload = (bytes(range(256)) * (length // 256 + 1))[:length]
    write = Request(7, Cmd.WRITE, 0, 4096, length, payload)
    follow = Request(8, Cmd.READ, 0, 0, 16)
    stream = encode(write) + encode(follow)
    arrived = min(arrived, 28 + length)
    decoder = RequestDecoder()
    decoder.receive_data(stream[:arrived])
    view = decoder.direct_payload(threshold=1)
    if arrived < 28 or arrived == 28 + length:
        assert view is None  # no header yet, or nothing missing
        decoder.receive_data(stream[arrived:])
        assert decoder.next_request() == write
    else:
        assert view is not None and len(view) == 28 + length - arrived
        view[:] = stream[arrived : 28 + length]
        assert decoder.complete_payload() == write
        decoder.receive_data(stream[28 + length :])
    assert decoder.next_request() == follow


def test_direct_payload_leaves_small_writes_to_the_buffer() -> None:
    decoder = RequestDecoder()
    decoder.receive_data(encode(Request(1, Cmd.WRITE, 0, 0, 100, bytes(100)))[:50])
    assert decoder.direct_payload(threshold=101) is None
