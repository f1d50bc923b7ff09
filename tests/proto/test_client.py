"""The sans-IO NBD client against server bytes built by hand from the spec's layouts."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xnbdd.proto.client import (
    ClientHandshake,
    ClientUsageError,
    Connected,
    HandshakeStyle,
    OptionRefused,
)
from xnbdd.proto.client_transmission import (
    BlockStatus,
    ClientTransmission,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
)
from xnbdd.proto.consts import (
    CLISERV_MAGIC,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TxFlag,
)
from xnbdd.proto.errors import ProtocolError

SIZE = 64 << 20


def oldstyle_greeting(size: int = SIZE, flags: int = 0x5) -> bytes:
    return struct.pack("!QQQI", NBDMAGIC, CLISERV_MAGIC, size, flags) + bytes(124)


def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack("!QIII", OPTION_REPLY_MAGIC, option, rep, len(data)) + data


def go_success(
    size: int = SIZE, flags: int = 0x5, block: tuple[int, int, int] | None = None
) -> bytes:
    out = option_reply(Opt.GO, Rep.INFO, struct.pack("!HQH", Info.EXPORT, size, flags))
    out += option_reply(Opt.GO, Rep.INFO, struct.pack("!HH", Info.NAME, 0) + b"")  # ignored
    if block:
        out += option_reply(Opt.GO, Rep.INFO, struct.pack("!HIII", Info.BLOCK_SIZE, *block))
    return out + option_reply(Opt.GO, Rep.ACK)


def feed(hs: ClientHandshake, data: bytes, step: int) -> tuple[Connected | None, bytes]:
    """Feed ``step`` bytes at a time until the handshake ends; return it and what is left."""
    for i in range(0, len(data), step):
        result = hs.receive_data(data[i : i + step])
        if result is not None:
            return result, hs.leftover() + data[i + step :]
    return None, b""


def test_oldstyle_sends_nothing() -> None:
    hs = ClientHandshake()
    result = hs.receive_data(oldstyle_greeting(12345, 0x7))
    assert result == Connected(HandshakeStyle.OLDSTYLE, 12345, TxFlag(0x7))
    assert hs.data_to_send() == b""


def test_non_fixed_newstyle_uses_export_name_and_reads_zeros() -> None:
    hs = ClientHandshake("disk1")
    assert hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 0)) is None
    sent = hs.data_to_send()
    assert sent == struct.pack("!IQII", 0, IHAVEOPT, Opt.EXPORT_NAME, 5) + b"disk1"
    answer = struct.pack("!QH", SIZE, 0x5) + bytes(124)
    assert hs.receive_data(answer[:-1]) is None  # the zeros are always waited for
    result = hs.receive_data(answer[-1:] + b"XY")
    assert result is not None and result.style is HandshakeStyle.NEWSTYLE
    assert result.size == SIZE and not result.structured
    assert hs.leftover() == b"XY"


def test_fixed_newstyle_structured_then_go() -> None:
    hs = ClientHandshake("exp", extended_headers=False)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3))
    sent = hs.data_to_send()
    assert sent[:4] == struct.pack("!I", 3)  # fixed + no zeroes, both offered
    assert sent[4:] == struct.pack("!QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    assert hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)) is None
    go = hs.data_to_send()
    name_and_info = struct.pack("!I", 3) + b"exp" + struct.pack("!HH", 1, Info.BLOCK_SIZE)
    assert go == struct.pack("!QII", IHAVEOPT, Opt.GO, len(name_and_info)) + name_and_info
    result = hs.receive_data(go_success(block=(512, 4096, 1 << 20)))
    assert result == Connected(
        HandshakeStyle.FIXED_NEWSTYLE, SIZE, TxFlag(0x5), True, 512, 4096, 1 << 20
    )


def test_structured_refused_and_go_unsupported_falls_back_to_export_name() -> None:
    hs = ClientHandshake("", extended_headers=False)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.data_to_send()
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"nope"))
    hs.data_to_send()
    assert hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNSUP)) is None
    assert hs.data_to_send() == struct.pack("!QII", IHAVEOPT, Opt.EXPORT_NAME, 0)
    result = hs.receive_data(struct.pack("!QH", 4096, 1) + bytes(124))
    assert result is not None and result.size == 4096 and not result.structured


def test_unknown_export_is_refused_with_the_servers_message() -> None:
    hs = ClientHandshake("missing", structured_replies=False, extended_headers=False)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    assert struct.pack("!QI", IHAVEOPT, Opt.GO) in hs.data_to_send()
    with pytest.raises(OptionRefused, match="ERR_UNKNOWN: no such export"):
        hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNKNOWN, b"no such export"))


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!QQ", 0x1234, IHAVEOPT),
        struct.pack("!QQ", NBDMAGIC, 0x99),
    ],
)
def test_bad_greeting(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ClientHandshake().receive_data(data)


def test_eof_during_handshake() -> None:
    with pytest.raises(ProtocolError):
        ClientHandshake().receive_data(b"")


def test_go_ack_without_export_info_is_a_protocol_error() -> None:
    hs = ClientHandshake(structured_replies=False, extended_headers=False)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    with pytest.raises(ProtocolError):
        hs.receive_data(option_reply(Opt.GO, Rep.ACK))


@given(st.integers(min_value=1, max_value=40), st.booleans())
def test_any_split_of_a_fixed_newstyle_handshake(chunk: int, structured: bool) -> None:
    hs = ClientHandshake("x", extended_headers=False)
    server = struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1)
    server += option_reply(Opt.STRUCTURED_REPLY, Rep.ACK if structured else Rep.ERR_UNSUP)
    server += go_success(block=(1, 4096, 1 << 25)) + b"tail"
    result, rest = feed(hs, server, chunk)
    assert result is not None and result.structured is structured and result.size == SIZE
    assert rest == b"tail"


# -- transmission ----------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack("!IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes, done: bool = False) -> bytes:
    return (
        struct.pack("!IHHQI", STRUCTURED_REPLY_MAGIC, int(done), kind, cookie, len(payload))
        + payload
    )


def test_request_encoding() -> None:
    tx = ClientTransmission(TxFlag(0x5))
    assert tx.request(Cmd.READ, 7, 4096, 512) == struct.pack(
        "!IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, 7, 4096, 512
    )
    wire = tx.request(Cmd.WRITE, 8, 0, 3, payload=b"abc")
    assert wire.endswith(b"abc") and len(wire) == 31
    assert tx.in_flight == 2


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (Cmd.TRIM, CmdFlag(0)),
        (Cmd.WRITE_ZEROES, CmdFlag(0)),
        (Cmd.CACHE, CmdFlag(0)),
        (Cmd.READ, CmdFlag.FUA),
        (Cmd.BLOCK_STATUS, CmdFlag(0)),
    ],
)
def test_never_sends_what_an_xnbd_server_did_not_advertise(command: Cmd, flags: CmdFlag) -> None:
    tx = ClientTransmission(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH)  # what xnbd-server offers
    with pytest.raises(ClientUsageError):
        tx.request(command, 1, 0, 4096, flags=flags)


def test_duplicate_cookie_refused() -> None:
    tx = ClientTransmission(TxFlag(1))
    tx.request(Cmd.READ, 1, 0, 1)
    with pytest.raises(ClientUsageError):
        tx.request(Cmd.READ, 1, 0, 1)


def test_simple_replies_out_of_order() -> None:
    tx = ClientTransmission(TxFlag(1))
    tx.request(Cmd.READ, 1, 0, 4)
    tx.request(Cmd.READ, 2, 100, 2)
    tx.request(Cmd.WRITE, 3, 0, 1, payload=b"z")
    events = tx.receive_data(
        simple_reply(2, 0, b"hi") + simple_reply(3, 5) + simple_reply(1, 0, b"ab")
    )
    assert events == [ReadData(2, 100, b"hi"), ReplyDone(2, 0), ReplyDone(3, 5)]
    assert tx.receive_data(b"cd") == [ReadData(1, 0, b"abcd"), ReplyDone(1, 0)]
    assert tx.in_flight == 0


def test_simple_read_error_has_no_data() -> None:
    tx = ClientTransmission(TxFlag(1))
    tx.request(Cmd.READ, 9, 0, 4096)
    assert tx.receive_data(simple_reply(9, 5)) == [ReplyDone(9, 5)]


def test_structured_read_data_hole_and_errors() -> None:
    tx = ClientTransmission(TxFlag(1), structured=True)
    tx.request(Cmd.READ, 1, 1000, 30)
    tx.request(Cmd.READ, 2, 0, 10)
    wire = chunk(1, ReplyType.OFFSET_HOLE, struct.pack("!QI", 1010, 20))
    wire += chunk(
        2, ReplyType.ERROR_OFFSET, struct.pack("!IH", 5, 3) + b"bad" + struct.pack("!Q", 4)
    )
    wire += chunk(1, ReplyType.OFFSET_DATA, struct.pack("!Q", 1000) + b"0123456789", done=True)
    wire += chunk(2, ReplyType.NONE, b"", done=True)
    events = tx.receive_data(wire)
    assert events == [
        ReadHole(1, 1010, 20),
        ReplyError(2, 5, "bad", 4),
        ReadData(1, 1000, b"0123456789"),
        ReplyDone(1, 0),
        ReplyDone(2, 5),
    ]


def test_structured_error_without_offset_and_block_status() -> None:
    tx = ClientTransmission(TxFlag(1), structured=True)
    tx.request(Cmd.WRITE, 5, 0, 1, payload=b"x")
    tx.request(Cmd.BLOCK_STATUS, 6, 0, 8192)
    wire = chunk(5, ReplyType.ERROR, struct.pack("!IH", 28, 0), done=True)
    wire += chunk(6, ReplyType.BLOCK_STATUS, struct.pack("!III", 1, 4096, 3), done=True)
    assert tx.receive_data(wire) == [
        ReplyError(5, 28, "", None),
        ReplyDone(5, 28),
        BlockStatus(6, 1, ((4096, 3),)),
        ReplyDone(6, 0),
    ]


@pytest.mark.parametrize(
    "wire",
    [
        simple_reply(99),  # unknown cookie
        struct.pack("!I", 0xDEADBEEF) + bytes(12),  # bad magic
        chunk(1, ReplyType.OFFSET_DATA, struct.pack("!Q", 5000) + b"x", done=True),  # outside range
        chunk(1, ReplyType.OFFSET_DATA, struct.pack("!Q", 0) + b"x", done=True),  # short READ
        chunk(1, ReplyType.NONE, b""),  # NONE without DONE
        chunk(1, 77, b"", done=True),  # unknown non-error chunk type
        simple_reply(1, 0, bytes(16)),  # simple success for READ after structured
    ],
)
def test_broken_replies_are_protocol_errors(wire: bytes) -> None:
    tx = ClientTransmission(TxFlag(1), structured=True)
    tx.request(Cmd.READ, 1, 0, 16)
    with pytest.raises(ProtocolError):
        tx.receive_data(wire)


def test_eof_with_requests_open() -> None:
    tx = ClientTransmission(TxFlag(1))
    tx.request(Cmd.READ, 1, 0, 16)
    with pytest.raises(ProtocolError):
        tx.receive_data(b"")


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200))
def test_byte_at_a_time_feeding_gives_the_same_events(splits: list[int]) -> None:
    def session() -> tuple[ClientTransmission, bytes]:
        tx = ClientTransmission(TxFlag(1), structured=True)
        tx.request(Cmd.READ, 1, 0, 64)
        tx.request(Cmd.READ, 2, 64, 8)
        wire = chunk(2, ReplyType.OFFSET_DATA, struct.pack("!Q", 64) + b"B" * 8, done=True)
        wire += chunk(1, ReplyType.OFFSET_DATA, struct.pack("!Q", 0) + b"A" * 32)
        wire += chunk(1, ReplyType.OFFSET_HOLE, struct.pack("!QI", 32, 32), done=True)
        return tx, wire

    tx, wire = session()
    whole = tx.receive_data(wire)
    tx, wire = session()
    pieces: list[object] = []
    pos = 0
    for size in splits:
        pieces += tx.receive_data(wire[pos : pos + size])
        pos += size
    pieces += tx.receive_data(wire[pos:]) if pos < len(wire) else []
    assert pieces == whole and len(whole) == 5


# -- extended headers ---------------------------------------------------------------------------

EXT_FLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_CACHE
G = 1 << 30


def xchunk(cookie: int, offset: int, kind: int, payload: bytes, done: bool = False) -> bytes:
    head = (EXTENDED_REPLY_MAGIC, int(done), kind, cookie, offset, len(payload))
    return struct.pack("!IHHQQQ", *head) + payload


def test_extended_headers_are_asked_first_and_imply_structured_replies() -> None:
    hs = ClientHandshake("exp")
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3))
    sent = hs.data_to_send()
    assert sent[4:] == struct.pack("!QII", IHAVEOPT, Opt.EXTENDED_HEADERS, 0)
    assert hs.receive_data(option_reply(Opt.EXTENDED_HEADERS, Rep.ACK)) is None
    assert struct.pack("!QI", IHAVEOPT, Opt.GO) in hs.data_to_send()  # no STRUCTURED_REPLY
    result = hs.receive_data(go_success())
    assert result is not None and result.extended and result.structured


def test_refused_extended_headers_fall_back_to_structured_replies() -> None:
    hs = ClientHandshake("exp")
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.data_to_send()
    hs.receive_data(option_reply(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP))
    assert hs.data_to_send() == struct.pack("!QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    hs.data_to_send()
    result = hs.receive_data(go_success())
    assert result is not None and result.structured and not result.extended


def test_go_unsupported_after_extended_headers_is_a_protocol_error() -> None:
    hs = ClientHandshake("exp")
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.receive_data(option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    with pytest.raises(ProtocolError):  # EXPORT_NAME is forbidden now: no way on
        hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNSUP))


@given(st.integers(min_value=1, max_value=40), st.sampled_from(["ack", "unsup", "invalid"]))
def test_any_split_of_an_extended_handshake(chunk: int, answer: str) -> None:
    hs = ClientHandshake("x")
    server = struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1)
    rep = {"ack": Rep.ACK, "unsup": Rep.ERR_UNSUP, "invalid": Rep.ERR_INVALID}[answer]
    server += option_reply(Opt.EXTENDED_HEADERS, rep)
    if answer != "ack":
        server += option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)
    server += go_success(block=(1, 4096, 1 << 25)) + b"tail"
    result, rest = feed(hs, server, chunk)
    assert result is not None and result.extended is (answer == "ack")
    assert result.structured and rest == b"tail"


def test_extended_request_encoding() -> None:
    tx = ClientTransmission(EXT_FLAGS, structured=True, extended=True)
    assert tx.request(Cmd.WRITE_ZEROES, 7, G, 5 * G) == struct.pack(
        "!IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, Cmd.WRITE_ZEROES, 7, G, 5 * G
    )
    wire = tx.request(Cmd.WRITE, 8, 0, 3, payload=b"abc")
    assert (
        wire
        == struct.pack("!IHHQQQ", EXTENDED_REQUEST_MAGIC, CmdFlag.PAYLOAD_LEN, Cmd.WRITE, 8, 0, 3)
        + b"abc"
    )
    with pytest.raises(ClientUsageError):  # the encoder owns the flag
        tx.request(Cmd.TRIM, 9, 0, 1, flags=CmdFlag.PAYLOAD_LEN)
    compact = ClientTransmission(EXT_FLAGS, structured=True)
    with pytest.raises(ClientUsageError):
        compact.request(Cmd.TRIM, 1, 0, 5 * G)


def test_block_status_context_ids_go_in_a_payload() -> None:
    flags = EXT_FLAGS | TxFlag.BLOCK_STATUS_PAYLOAD
    tx = ClientTransmission(flags, structured=True, extended=True)
    wire = tx.request(Cmd.BLOCK_STATUS, 3, 4096, 5 * G, context_ids=[2])
    payload = struct.pack("!QI", 5 * G, 2)
    head = (EXTENDED_REQUEST_MAGIC, CmdFlag.PAYLOAD_LEN, Cmd.BLOCK_STATUS, 3, 4096, 12)
    assert wire == struct.pack("!IHHQQQ", *head) + payload
    reply = struct.pack("!IIQQ", 2, 1, 5 * G, 3)
    events = tx.receive_data(xchunk(3, 4096, ReplyType.BLOCK_STATUS_EXT, reply, done=True))
    assert events == [BlockStatus(3, 2, ((5 * G, 3),)), ReplyDone(3, 0)]
    without = ClientTransmission(EXT_FLAGS, structured=True, extended=True)
    with pytest.raises(ClientUsageError):
        without.request(Cmd.BLOCK_STATUS, 3, 0, 1, context_ids=[1])


def test_extended_replies_of_every_kind() -> None:
    tx = ClientTransmission(EXT_FLAGS, structured=True, extended=True)
    tx.request(Cmd.READ, 1, 1000, 30)
    tx.request(Cmd.TRIM, 2, 7 * G, 5 * G)
    tx.request(Cmd.BLOCK_STATUS, 3, 0, 8 * G)
    wire = xchunk(1, 1000, ReplyType.OFFSET_HOLE, struct.pack("!QI", 1010, 20))
    wire += xchunk(2, 7 * G, ReplyType.ERROR, struct.pack("!IH", 5, 3) + b"bad", done=True)
    wire += xchunk(1, 1000, ReplyType.OFFSET_DATA, struct.pack("!Q", 1000) + b"0123456789")
    wire += xchunk(1, 1000, ReplyType.NONE, b"", done=True)
    status = struct.pack("!IIQQQQ", 1, 2, 5 * G, 3, 3 * G, 0)
    wire += xchunk(3, 0, ReplyType.BLOCK_STATUS_EXT, status, done=True)
    assert tx.receive_data(wire) == [
        ReadHole(1, 1010, 20),
        ReplyError(2, 5, "bad", None),
        ReplyDone(2, 5),
        ReadData(1, 1000, b"0123456789"),
        ReplyDone(1, 0),
        BlockStatus(3, 1, ((5 * G, 3), (3 * G, 0))),
        ReplyDone(3, 0),
    ]


@pytest.mark.parametrize(
    "wire",
    [
        simple_reply(1),  # no simple replies with extended headers
        chunk(1, ReplyType.NONE, b"", done=True),  # nor structured ones
        xchunk(1, 4096, ReplyType.NONE, b"", done=True),  # offset not the request's
        xchunk(2, 0, ReplyType.BLOCK_STATUS, struct.pack("!III", 1, 512, 0), done=True),
        xchunk(2, 0, ReplyType.BLOCK_STATUS_EXT, struct.pack("!IIQQ", 1, 2, 512, 0), done=True),
        xchunk(2, 0, ReplyType.BLOCK_STATUS_EXT, struct.pack("!II", 1, 0), done=True),
    ],
)
def test_broken_extended_replies_are_protocol_errors(wire: bytes) -> None:
    tx = ClientTransmission(EXT_FLAGS, structured=True, extended=True)
    tx.request(Cmd.READ, 1, 0, 16)
    tx.request(Cmd.BLOCK_STATUS, 2, 0, 4096)
    with pytest.raises(ProtocolError):
        tx.receive_data(wire)


def test_block_status_ext_without_extended_headers_is_a_protocol_error() -> None:
    tx = ClientTransmission(EXT_FLAGS, structured=True)
    tx.request(Cmd.BLOCK_STATUS, 2, 0, 4096)
    with pytest.raises(ProtocolError):
        tx.receive_data(chunk(2, ReplyType.BLOCK_STATUS_EXT, struct.pack("!IIQQ", 1, 1, 1, 0)))


OPEN = {1: (Cmd.READ, 0, 16), 2: (Cmd.BLOCK_STATUS, 0, 4096), 3: (Cmd.TRIM, 0, 5 * G)}
KINDS = [int(k) for k in ReplyType] + [3, 77, 0x8003, 0xFFFF]


@st.composite
def extended_chunks(draw: st.DrawFn) -> bytes:
    """A reply chunk that is plausible enough to reach the payload decoders: a cookie in
    flight, usually its offset and true length, any type, any flags, any payload bytes."""
    cookie = draw(st.sampled_from([1, 2, 3, 99]))
    offset = OPEN.get(cookie, (0, 0, 0))[1] if draw(st.booleans()) else draw(st.integers(0, 9))
    payload = draw(st.binary(max_size=80))
    length = len(payload) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    head = (EXTENDED_REPLY_MAGIC, draw(st.integers(0, 0xFFFF)), draw(st.sampled_from(KINDS)))
    return struct.pack("!IHHQQQ", *head, cookie, offset, length) + payload


@given(st.lists(extended_chunks(), max_size=6), st.lists(st.integers(1, 64), max_size=20))
def test_arbitrary_extended_replies_never_break_the_decoder(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """Whatever arrives, the decoder yields events or raises ProtocolError, nothing else."""
    tx = ClientTransmission(EXT_FLAGS, structured=True, extended=True)
    for cookie, (command, offset, length) in OPEN.items():
        tx.request(command, cookie, offset, length)
    wire = b"".join(chunks)
    try:
        pos = 0
        for cut in cuts:
            tx.receive_data(wire[pos : pos + cut])
            pos += cut
        if pos < len(wire):
            tx.receive_data(wire[pos:])
    except ProtocolError:
        pass


# -- STARTTLS ------------------------------------------------------------------------------------

FIXED_GREETING = struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3)


def test_starttls_comes_first_and_negotiation_continues_inside_tls() -> None:
    hs = ClientHandshake("disk", starttls=True, extended_headers=False)
    assert hs.receive_data(FIXED_GREETING) is None
    assert hs.data_to_send() == struct.pack("!I", 3) + struct.pack(
        "!QII", IHAVEOPT, Opt.STARTTLS, 0
    )
    assert hs.receive_data(option_reply(Opt.STARTTLS, Rep.ACK)) is None
    assert hs.wants_tls and hs.data_to_send() == b""
    with pytest.raises(ClientUsageError):
        hs.receive_data(b"x")
    hs.tls_started()
    assert hs.data_to_send() == struct.pack("!QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    assert hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)) is None
    result = hs.receive_data(go_success())
    assert result is not None and result.size == SIZE and result.structured


def test_extended_headers_are_asked_inside_tls_not_before() -> None:
    hs = ClientHandshake("disk", starttls=True)
    hs.receive_data(FIXED_GREETING)
    assert hs.data_to_send()[4:] == struct.pack("!QII", IHAVEOPT, Opt.STARTTLS, 0)
    hs.receive_data(option_reply(Opt.STARTTLS, Rep.ACK))
    hs.tls_started()
    assert hs.data_to_send() == struct.pack("!QII", IHAVEOPT, Opt.EXTENDED_HEADERS, 0)
    hs.receive_data(option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    result = hs.receive_data(go_success())
    assert result is not None and result.extended and result.structured


def test_a_refused_starttls_is_an_error_not_a_fallback_to_the_clear() -> None:
    hs = ClientHandshake("disk", starttls=True)
    hs.receive_data(FIXED_GREETING)
    hs.data_to_send()
    with pytest.raises(OptionRefused, match="STARTTLS: ERR_UNSUP"):
        hs.receive_data(option_reply(Opt.STARTTLS, Rep.ERR_UNSUP))


def test_tls_is_impossible_with_oldstyle_and_non_fixed_servers() -> None:
    with pytest.raises(ProtocolError, match="oldstyle"):
        ClientHandshake(starttls=True).receive_data(oldstyle_greeting())
    with pytest.raises(ProtocolError, match="fixed newstyle"):
        ClientHandshake(starttls=True).receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 0))


def test_clear_bytes_behind_the_starttls_ack_are_refused() -> None:
    hs = ClientHandshake(starttls=True)
    hs.receive_data(FIXED_GREETING)
    hs.receive_data(option_reply(Opt.STARTTLS, Rep.ACK) + b"junk")
    with pytest.raises(ProtocolError, match="in the clear"):
        hs.tls_started()


def meta_context_request(name: bytes, *queries: bytes) -> bytes:
    data = struct.pack("!I", len(name)) + name + struct.pack("!I", len(queries))
    data += b"".join(struct.pack("!I", len(q)) + q for q in queries)
    return struct.pack("!QII", IHAVEOPT, Opt.SET_META_CONTEXT, len(data)) + data


def test_allocation_asks_set_meta_context_after_structured_replies() -> None:
    hs = ClientHandshake("exp", extended_headers=False, allocation=True)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.data_to_send()
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert hs.data_to_send() == meta_context_request(b"exp", b"base:allocation")
    context = struct.pack("!I", 7) + b"base:allocation"
    assert hs.receive_data(option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, context)) is None
    hs.receive_data(option_reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert struct.pack("!QI", IHAVEOPT, Opt.GO) in hs.data_to_send()
    result = hs.receive_data(go_success())
    assert result is not None and result.allocation_id == 7


@pytest.mark.parametrize("answer", [Rep.ERR_UNSUP, Rep.ACK])
def test_allocation_refused_or_not_offered_means_no_context(answer: Rep) -> None:
    hs = ClientHandshake("exp", allocation=True)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.receive_data(option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    assert hs.data_to_send()[-len(b"base:allocation") :] == b"base:allocation"
    hs.receive_data(option_reply(Opt.SET_META_CONTEXT, answer))  # ACK alone: no context
    result = hs.receive_data(go_success())
    assert result is not None and result.extended and result.allocation_id is None


def test_no_structured_replies_means_no_meta_context_asked() -> None:
    hs = ClientHandshake("exp", extended_headers=False, allocation=True)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.data_to_send()
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP))
    assert struct.pack("!QI", IHAVEOPT, Opt.GO) in hs.data_to_send()
    result = hs.receive_data(go_success())
    assert result is not None and result.allocation_id is None
