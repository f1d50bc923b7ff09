"""Request validation, by Hypothesis over every command x flag combination. (Framing is the
data plane's: tests/test_dataplane.py.)"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.proto.consts import (
    EXTENDED_REPLY_MAGIC,
    MAX_PAYLOAD,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    TxFlag,
)
from xnbdd.proto.errors import RequestError
from xnbdd.proto.messages import Request
from xnbdd.proto.transmission import (
    block_status_chunk,
    check_request,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole,
)

ALL_TX = TxFlag(sum(TxFlag))
SIZE = 1 << 20


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


# -- extended headers -------------------------------------------------------------------------

EXT_SIZE = 1 << 40  # a large sparse export: 64-bit effect lengths are in range
CONTEXTS = {1: "base:allocation", 2: "x-xnbd:cached"}


def status_payload(length: int, *ids: int) -> bytes:
    return struct.pack(f"!Q{len(ids)}I", length, *ids)


@settings(max_examples=1000)
@given(
    cmd=st.integers(0, 12),
    flags=st.integers(0, 0xFFFF),
    offset=st.one_of(st.integers(0, EXT_SIZE + 10), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 4096), st.integers(0, 2**33), st.integers(0, 2**64 - 1)),
)
def test_extended_validation_follows_the_spec(
    cmd: int, flags: int, offset: int, length: int
) -> None:
    """Without a payload (none is attached here) the length is an effect length of 64 bits;
    READ and WRITE stay bounded by the maximum payload; PAYLOAD_LEN is valid on WRITE, and on
    BLOCK_STATUS when BLOCK_STATUS_PAYLOAD is advertised (an empty payload is then EINVAL)."""
    req = Request(1, cmd, flags, offset, length)
    errno: Errno | None
    try:
        check_request(
            req,
            size=EXT_SIZE,
            tx_flags=ALL_TX & ~TxFlag.READ_ONLY,
            structured=True,
            has_contexts=True,
            extended=True,
            context_ids=CONTEXTS,
        )
    except RequestError as err:
        errno = err.errno
    else:
        errno = None
    if cmd not in ALLOWED:
        assert errno is Errno.EINVAL
        return
    command = Cmd(cmd)
    allowed = int(ALLOWED[command])
    if command in (Cmd.WRITE, Cmd.BLOCK_STATUS):
        allowed |= int(CmdFlag.PAYLOAD_LEN)
    if flags & ~allowed:
        assert errno is Errno.EINVAL
    elif command is Cmd.FLUSH:
        assert errno is (Errno.EINVAL if offset or length else None)
    elif command is Cmd.DISC:
        assert errno is None
    elif command is Cmd.READ and length > MAX_PAYLOAD:
        assert errno is Errno.EOVERFLOW
    elif command is Cmd.WRITE and length > MAX_PAYLOAD:
        assert errno is Errno.EINVAL
    elif command is Cmd.BLOCK_STATUS and flags & CmdFlag.PAYLOAD_LEN:
        assert errno is Errno.EINVAL  # no payload came with the flag
    elif offset + length > EXT_SIZE:
        want = Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        assert errno is want
    elif command is Cmd.BLOCK_STATUS and length == 0:
        assert errno is Errno.EINVAL
    else:
        assert errno is None


def check_extended(req: Request, tx: TxFlag = ALL_TX & ~TxFlag.READ_ONLY) -> Request:
    return check_request(
        req,
        size=EXT_SIZE,
        tx_flags=tx,
        structured=True,
        has_contexts=True,
        extended=True,
        context_ids=CONTEXTS,
    )


def test_block_status_payload_gives_the_effect_length_and_the_contexts() -> None:
    flags = CmdFlag.PAYLOAD_LEN | CmdFlag.REQ_ONE
    wire = status_payload(5 << 30, 2)
    req = check_extended(Request(7, Cmd.BLOCK_STATUS, flags, 4096, len(wire), wire))
    assert (req.length, req.contexts, req.data, req.offset) == (5 << 30, (2,), None, 4096)
    both = status_payload(1, 2, 1)
    req = check_extended(Request(7, Cmd.BLOCK_STATUS, CmdFlag.PAYLOAD_LEN, 0, len(both), both))
    assert req.contexts == (2, 1)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        status_payload(4096),  # no context id
        status_payload(4096, 1)[:-1],  # not 8 + 4n bytes
        status_payload(4096, 1, 1),  # a repeat
        status_payload(4096, 3),  # never selected
        status_payload(EXT_SIZE + 1, 1),  # beyond the end
        status_payload(0, 1),  # zero length
    ],
)
def test_bad_block_status_payloads_are_einval(payload: bytes) -> None:
    req = Request(1, Cmd.BLOCK_STATUS, CmdFlag.PAYLOAD_LEN, 0, len(payload), payload)
    with pytest.raises(RequestError) as info:
        check_extended(req)
    assert info.value.errno is Errno.EINVAL


def test_payload_form_needs_its_flag_and_extended_headers() -> None:
    wire = status_payload(4096, 1)
    req = Request(1, Cmd.BLOCK_STATUS, CmdFlag.PAYLOAD_LEN, 0, len(wire), wire)
    with pytest.raises(RequestError):
        check_extended(req, ALL_TX & ~TxFlag.BLOCK_STATUS_PAYLOAD & ~TxFlag.READ_ONLY)
    with pytest.raises(RequestError):  # compact headers: the flag is unknown
        check_request(req, size=SIZE, tx_flags=ALL_TX, structured=True, has_contexts=True)
    write = Request(1, Cmd.WRITE, CmdFlag.PAYLOAD_LEN, 0, 1, b"x")
    with pytest.raises(RequestError):
        check_request(write, size=SIZE, tx_flags=ALL_TX, structured=True, has_contexts=True)
    # with extended headers a WRITE is a WRITE with the flag (spec) and without it (qemu 10)
    assert check_extended(write) is write
    assert check_extended(Request(1, Cmd.WRITE, 0, 0, 1, b"x")).length == 1


# -- reply encoding, decoded by the spec's layouts ----------------------------------------------

EXT_CHUNK = struct.Struct("!IHHQQQ")


def test_extended_reply_headers_echo_the_request_offset() -> None:
    offset = (5 << 30) + 512
    none = none_chunk(9, extended=True, offset=offset)
    assert EXT_CHUNK.unpack(none) == (EXTENDED_REPLY_MAGIC, 1, 0, 9, offset, 0)
    error = error_chunk(9, Errno.EINVAL, "no", extended=True, offset=offset)
    assert EXT_CHUNK.unpack_from(error) == (EXTENDED_REPLY_MAGIC, 1, 0x8001, 9, offset, 8)
    assert error[32:] == struct.pack("!IH", 22, 2) + b"no"
    data = offset_data_header(9, offset, 4096, done=True, extended=True)
    assert EXT_CHUNK.unpack_from(data) == (EXTENDED_REPLY_MAGIC, 1, 1, 9, offset, 4104)
    assert data[32:] == struct.pack("!Q", offset) and len(data) == 40
    hole = offset_hole(9, offset, 1 << 20, done=True, extended=True)
    assert EXT_CHUNK.unpack_from(hole) == (EXTENDED_REPLY_MAGIC, 1, 2, 9, offset, 12)
    assert hole[32:] == struct.pack("!QI", offset, 1 << 20)
    # the compact forms are unchanged
    assert none_chunk(9) == struct.pack("!IHHQI", STRUCTURED_REPLY_MAGIC, 1, 0, 9, 0)


@given(
    extents=st.lists(
        st.tuples(st.integers(1, 2**64 - 1), st.integers(0, 3)), min_size=1, max_size=50
    ),
    context=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1),
    done=st.booleans(),
)
def test_block_status_ext_layout(
    extents: list[tuple[int, int]], context: int, offset: int, done: bool
) -> None:
    wire = block_status_chunk(9, context, extents, done=done, extended=True, offset=offset)
    magic, flags, kind, cookie, echo, length = EXT_CHUNK.unpack_from(wire)
    assert (magic, flags, kind, cookie, echo) == (EXTENDED_REPLY_MAGIC, int(done), 6, 9, offset)
    assert length == len(wire) - 32 == 8 + 16 * len(extents)
    assert struct.unpack_from("!II", wire, 32) == (context, len(extents))
    assert list(struct.iter_unpack("!QQ", wire[40:])) == extents
