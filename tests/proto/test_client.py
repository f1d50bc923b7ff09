"""The sans-IO NBD client against server bytes built by hand from the spec's layouts."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xnbdd.proto.client import (
    BlockStatus,
    ClientHandshake,
    ClientTransmission,
    ClientUsageError,
    Connected,
    HandshakeStyle,
    OptionRefused,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
)
from xnbdd.proto.consts import (
    CLISERV_MAGIC,
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
    hs = ClientHandshake("exp")
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
    hs = ClientHandshake("")
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    hs.data_to_send()
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"nope"))
    hs.data_to_send()
    assert hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNSUP)) is None
    assert hs.data_to_send() == struct.pack("!QII", IHAVEOPT, Opt.EXPORT_NAME, 0)
    result = hs.receive_data(struct.pack("!QH", 4096, 1) + bytes(124))
    assert result is not None and result.size == 4096 and not result.structured


def test_unknown_export_is_refused_with_the_servers_message() -> None:
    hs = ClientHandshake("missing", structured_replies=False)
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
    hs = ClientHandshake(structured_replies=False)
    hs.receive_data(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 1))
    with pytest.raises(ProtocolError):
        hs.receive_data(option_reply(Opt.GO, Rep.ACK))


@given(st.integers(min_value=1, max_value=40), st.booleans())
def test_any_split_of_a_fixed_newstyle_handshake(chunk: int, structured: bool) -> None:
    hs = ClientHandshake("x")
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


# -- STARTTLS ------------------------------------------------------------------------------------

FIXED_GREETING = struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3)


def test_starttls_comes_first_and_negotiation_continues_inside_tls() -> None:
    hs = ClientHandshake("disk", starttls=True)
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
