"""The sans-IO core under arbitrary bytes (Hypothesis): the server handshake machine and the
client's reply framing never raise anything but their own errors, never write a malformed reply,
and give the same result however the bytes are cut. The wire fuzzer (tests/fuzz) does the same
against the running daemon."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.proto.client import ClientHandshake
from xnbdd.proto.client_transmission import ClientTransmission, ReplyDone
from xnbdd.proto.consts import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Cmd, Opt, Rep, TxFlag
from xnbdd.proto.errors import NBDError, RequestError
from xnbdd.proto.handshake import HandshakeState
from xnbdd.proto.messages import ExportInfo, Request
from xnbdd.proto.transmission import check_request, error_chunk, simple_reply

from .answering import AnsweringHandshake

EXPORT = ExportInfo(
    name="disk",
    size=1 << 20,
    tx_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH,
    meta_contexts=("base:allocation",),
)
GREETING = 18


def lookup(name: str) -> ExportInfo | None:
    return EXPORT if name in ("", "disk") else None


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack("!QII", IHAVEOPT, opt, len(data)) + data


# hostile client bytes: valid options, option-shaped junk and plain noise, glued together
OPTION_BYTES = st.builds(
    option,
    st.one_of(st.sampled_from(list(Opt)), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)
PIECES = st.lists(
    st.one_of(
        OPTION_BYTES,
        st.binary(max_size=40),
        st.just(struct.pack("!I", 3)),
        st.builds(lambda n: struct.pack("!QII", IHAVEOPT, 7, n), st.integers(0, 2**32 - 1)),
    ),
    max_size=12,
)


def run(data: bytes, cuts: list[int], refusal: str = "") -> tuple[bytes, HandshakeState]:
    hs = AnsweringHandshake(lookup, lambda: [EXPORT], refusal=refusal)
    out = bytearray(hs.data_to_send())
    pos = 0
    for cut in [*cuts, len(data)]:
        if hs.state is HandshakeState.CLOSED:
            break
        hs.receive_data(data[pos : pos + cut])
        out += hs.data_to_send()
        pos += cut
    return bytes(out), hs.state


def check_framing(out: bytes, refusal: bool) -> None:
    """After the greeting: option replies only, whole, each with its magic (a GO or EXPORT_NAME
    success ends the handshake, and then only EXPORT_NAME's size+flags may follow)."""
    assert out[:8] == struct.pack("!Q", NBDMAGIC)
    pos = GREETING
    while pos < len(out):
        if len(out) - pos in (10, 134):  # EXPORT_NAME's answer, with or without zero padding
            assert not refusal
            return
        magic, _opt, rep, length = struct.unpack_from("!QIII", out, pos)
        assert magic == OPTION_REPLY_MAGIC
        assert length <= 4096 + 64
        if refusal:
            assert rep in (Rep.ERR_POLICY, Rep.ACK, Rep.ERR_TOO_BIG), hex(rep)
        pos += 20 + length
        assert pos <= len(out)


@settings(max_examples=400, deadline=None)
@given(PIECES, st.lists(st.integers(1, 30), max_size=40), st.booleans())
def test_server_handshake_under_arbitrary_bytes(
    pieces: list[bytes], cuts: list[int], refuse: bool
) -> None:
    data = b"".join(pieces)
    refusal = "busy" if refuse else ""
    whole, state = run(data, [], refusal)
    check_framing(whole, refuse)
    if refuse:
        assert state is not HandshakeState.DONE  # a refused client never gets an export
    # however the bytes are cut, the same answer and the same end
    assert run(data, cuts, refusal) == (whole, state)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64), st.booleans())
def test_client_handshake_under_arbitrary_server_bytes(
    data: bytes, chunk: int, prefix: bool
) -> None:
    if prefix:  # get past the greeting sometimes, to reach the option replies
        data = struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3) + data
    hs = ClientHandshake("disk")
    try:
        for pos in range(0, len(data), chunk):
            if hs.receive_data(data[pos : pos + chunk]) is not None:
                break
            hs.data_to_send()
    except NBDError:
        pass  # the only way it may refuse bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64), st.booleans())
def test_reply_framing_under_arbitrary_bytes(data: bytes, chunk: int, structured: bool) -> None:
    tx = ClientTransmission(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, structured)
    for cookie in range(1, 5):
        tx.request(Cmd.READ, cookie, cookie * 512, 512)
    tx.request(Cmd.FLUSH, 9)
    try:
        for pos in range(0, len(data), chunk):
            for event in tx.receive_data(data[pos : pos + chunk]):
                assert event.cookie in (1, 2, 3, 4, 9)
    except NBDError:
        pass


ALL_TX = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_CACHE
    | TxFlag.SEND_DF
)
SPEC_ERRNOS = {1, 5, 12, 22, 28, 75, 95, 108}


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=28, max_size=28), st.booleans(), st.booleans())
def test_any_request_header_is_refused_with_a_spec_errno_in_a_well_framed_reply(
    header: bytes, structured: bool, readonly: bool
) -> None:
    """Arbitrary 28 header bytes (the magic aside: the data plane checks it): validation
    accepts them or refuses with an errno the spec allows, and the refusal decodes on a client
    as exactly that error."""
    _magic, flags, cmd, cookie, offset, length = struct.unpack("!IHHQQI", header)
    tx = ALL_TX | (TxFlag.READ_ONLY if readonly else TxFlag(0))
    req = Request(
        cookie, cmd, flags, offset, length, b"x" * length if cmd == 1 and length < 64 else None
    )
    try:
        check_request(
            req, size=1 << 20, tx_flags=tx, structured=structured, has_contexts=structured
        )
    except RequestError as err:
        assert int(err.errno) in SPEC_ERRNOS
        wire = (
            error_chunk(cookie, err.errno, err.message)
            if structured
            else simple_reply(cookie, err.errno)
        )
        client = ClientTransmission(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, structured)
        client.request(Cmd.FLUSH, cookie)
        events = client.receive_data(wire)
        assert events[-1] == ReplyDone(cookie, int(err.errno))
