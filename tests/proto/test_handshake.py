"""The sans-IO server handshake, driven byte by byte and by Hypothesis over options."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.proto.consts import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from xnbdd.proto.handshake import (
    MAX_OPTION_DATA,
    ExportRequested,
    HandshakeState,
    ListRequested,
    ServerHandshake,
    TLSPolicy,
    select_contexts,
)
from xnbdd.proto.messages import ExportInfo

from .answering import AnsweringHandshake

EXPORT = ExportInfo(
    name="disk",
    size=1 << 20,
    tx_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH,  # infos come without SEND_DF
    description="a disk",
    meta_contexts=("base:allocation", "x-xnbd:cached"),
)


def lookup(name: str) -> ExportInfo | None:
    return EXPORT if name in ("", "disk") else None


def new() -> ServerHandshake:
    hs = AnsweringHandshake(lookup, lambda: [EXPORT])
    assert hs.data_to_send() == struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 3)
    return hs


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack("!QII", IHAVEOPT, opt, len(data)) + data


def info_data(name: bytes, *types: int) -> bytes:
    return struct.pack("!I", len(name)) + name + struct.pack(f"!H{len(types)}H", len(types), *types)


def meta_data(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack("!I", len(name)) + name + struct.pack("!I", len(queries))
    return out + b"".join(struct.pack("!I", len(q)) + q for q in queries)


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from("!QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


FULL_NEGOTIATION = (
    struct.pack("!I", 3)
    + option(Opt.LIST)
    + option(0x1234, b"whatever")
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:"))
    + option(Opt.INFO, info_data(b"disk", Info.NAME, Info.DESCRIPTION))
    + option(Opt.GO, info_data(b"disk"))
)


@given(st.lists(st.integers(1, 40), max_size=200))
def test_any_chunking_gives_the_same_conversation(cuts: list[int]) -> None:
    whole = new()
    whole.receive_data(FULL_NEGOTIATION + b"pipelined")
    expected = whole.data_to_send()
    hs = new()
    out = bytearray()
    pos = 0
    for cut in cuts:
        hs.receive_data(FULL_NEGOTIATION[pos : pos + cut])
        out += hs.data_to_send()
        pos += cut
    hs.receive_data(FULL_NEGOTIATION[pos:] + b"pipelined")
    out += hs.data_to_send()
    assert bytes(out) == expected
    assert hs.state is HandshakeState.DONE and whole.state is HandshakeState.DONE
    assert hs.leftover() == b"pipelined"
    assert hs.negotiated is not None and hs.negotiated.structured
    assert hs.negotiated.meta_contexts == {1: "base:allocation"}
    assert hs.negotiated.tx_flags & TxFlag.SEND_DF


@settings(max_examples=300)
@given(
    flags=st.sampled_from([0, 1, 3]),
    structured=st.booleans(),
    opt=st.one_of(st.sampled_from(list(Opt)), st.integers(0, 2**32 - 1)),
    data=st.binary(max_size=300),
)
def test_every_option_in_every_state_gets_a_final_reply_or_ends(
    flags: int, structured: bool, opt: int, data: bytes
) -> None:
    hs = new()
    hs.receive_data(struct.pack("!I", flags))
    if structured:
        hs.receive_data(option(Opt.STRUCTURED_REPLY))
        hs.data_to_send()
    hs.receive_data(option(opt, data))
    out = hs.data_to_send()
    if opt == Opt.EXPORT_NAME:
        if hs.state is HandshakeState.DONE:
            assert len(out) == 10 + (0 if flags & 2 else 124)
        else:
            assert hs.state is HandshakeState.CLOSED and out == b""
        return
    replies = parse_replies(out)
    assert replies, "every option but EXPORT_NAME gets at least one reply"
    assert all(reply_opt == opt for reply_opt, _rep, _data in replies)
    final = replies[-1][1]
    assert final == Rep.ACK or final & 0x80000000
    assert all(rep != Rep.ACK for _o, rep, _d in replies[:-1])
    if opt == Opt.ABORT:
        assert hs.state is HandshakeState.CLOSED
    elif opt == Opt.GO and final == Rep.ACK:
        assert hs.state is HandshakeState.DONE
    else:
        assert hs.state is HandshakeState.OPTIONS
    if opt not in set(Opt) or opt in (Opt.PEEK_EXPORT, Opt.STARTTLS):
        assert final == Rep.ERR_UNSUP
    if opt == Opt.EXTENDED_HEADERS:
        assert final == (Rep.ERR_INVALID if data else Rep.ACK)


@given(st.integers(0, 2**32 - 1))
def test_client_flags_with_unknown_bits_close(flags: int) -> None:
    hs = new()
    hs.receive_data(struct.pack("!I", flags))
    if flags & ~3:
        assert hs.state is HandshakeState.CLOSED
    else:
        assert hs.state is HandshakeState.OPTIONS
        assert hs.no_zeroes == bool(flags & 2)
    assert hs.data_to_send() == b""


def test_go_reply_carries_export_info_and_block_sizes() -> None:
    hs = new()
    hs.receive_data(struct.pack("!I", 1) + option(Opt.GO, info_data(b"", Info.NAME)))
    replies = parse_replies(hs.data_to_send())
    kinds = [struct.unpack_from("!H", d)[0] for _o, rep, d in replies if rep == Rep.INFO]
    assert kinds == [Info.EXPORT, Info.NAME, Info.BLOCK_SIZE]
    assert replies[-1][1] == Rep.ACK
    _opt, _rep, export = replies[0]
    assert struct.unpack("!HQH", export) == (0, 1 << 20, TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH)


def test_contexts_set_for_another_export_do_not_carry_over() -> None:
    other = ExportInfo(
        name="other", size=512, tx_flags=TxFlag.HAS_FLAGS, meta_contexts=("base:allocation",)
    )

    def two(name: str) -> ExportInfo | None:
        return {"disk": EXPORT, "other": other}.get(name)

    hs = AnsweringHandshake(two, lambda: [EXPORT, other])
    hs.receive_data(
        struct.pack("!I", 1)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
        + option(Opt.GO, info_data(b"other"))
    )
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == {}


def test_oldstyle_greeting_is_152_bytes_and_goes_straight_to_transmission() -> None:
    hs = ServerHandshake(oldstyle=EXPORT)
    greeting = hs.data_to_send()
    assert len(greeting) == 152
    magic, cliserv, size, flags = struct.unpack_from("!QQQI", greeting)
    assert (magic, cliserv, size) == (NBDMAGIC, 0x00420281861253, 1 << 20)
    assert flags == EXPORT.tx_flags and greeting[28:] == bytes(124)
    assert hs.state is HandshakeState.DONE


def test_select_contexts_matches_names_and_namespaces() -> None:
    names = ["base:allocation", "x-xnbd:cached"]
    assert select_contexts(names, ["base:"]) == ["base:allocation"]
    assert select_contexts(names, ["x-xnbd:cached", "base:allocation"]) == [
        "x-xnbd:cached",
        "base:allocation",
    ]
    assert select_contexts(names, ["qemu:"]) == []


# -- extended headers ---------------------------------------------------------------------------


def go_flags(replies: list[tuple[int, int, bytes]]) -> TxFlag:
    """The transmission flags of the NBD_INFO_EXPORT in a GO/INFO answer."""
    for _opt, rep, data in replies:
        if rep == Rep.INFO and struct.unpack_from("!H", data)[0] == Info.EXPORT:
            return TxFlag(struct.unpack("!HQH", data)[2])
    raise AssertionError("no NBD_INFO_EXPORT")


def test_extended_headers_imply_structured_replies_and_refuse_a_later_structured_reply() -> None:
    hs = new()
    hs.receive_data(
        struct.pack("!I", 3)
        + option(Opt.EXTENDED_HEADERS)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
        + option(Opt.GO, info_data(b"disk"))
    )
    replies = parse_replies(hs.data_to_send())
    assert replies[0] == (Opt.EXTENDED_HEADERS, Rep.ACK, b"")
    assert replies[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_EXT_HEADER_REQD)
    assert replies[2][1] == Rep.META_CONTEXT  # contexts need structured replies: implied
    assert hs.state is HandshakeState.DONE and hs.negotiated is not None
    assert hs.negotiated.extended and hs.negotiated.structured
    assert hs.negotiated.meta_contexts == {1: "base:allocation"}
    flags = go_flags(replies)
    assert flags & TxFlag.SEND_DF and flags & TxFlag.BLOCK_STATUS_PAYLOAD
    assert hs.negotiated.tx_flags == flags


def test_structured_reply_first_then_extended_headers_is_allowed() -> None:
    hs = new()
    hs.receive_data(
        struct.pack("!I", 1)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.EXTENDED_HEADERS)
        + option(Opt.GO, info_data(b""))
    )
    replies = parse_replies(hs.data_to_send())
    assert [r[:2] for r in replies[:2]] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.EXTENDED_HEADERS, Rep.ACK),
    ]
    assert hs.negotiated is not None and hs.negotiated.extended
    # no context selected: the payload form of BLOCK_STATUS is not advertised (SHOULD NOT)
    assert not go_flags(replies) & TxFlag.BLOCK_STATUS_PAYLOAD


def test_block_status_payload_is_never_advertised_without_extended_headers() -> None:
    hs = new()
    hs.receive_data(
        struct.pack("!I", 1)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:"))
        + option(Opt.INFO, info_data(b"disk"))
        + option(Opt.GO, info_data(b"disk"))
    )
    replies = parse_replies(hs.data_to_send())
    assert not go_flags(replies) & TxFlag.BLOCK_STATUS_PAYLOAD
    assert hs.negotiated is not None and not hs.negotiated.extended


def test_info_then_go_report_the_same_flags_with_extended_headers() -> None:
    hs = new()
    hs.receive_data(
        struct.pack("!I", 1)
        + option(Opt.EXTENDED_HEADERS)
        + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
    )
    hs.data_to_send()
    hs.receive_data(option(Opt.INFO, info_data(b"disk")))
    info = go_flags(parse_replies(hs.data_to_send()))
    hs.receive_data(option(Opt.GO, info_data(b"disk")))
    assert go_flags(parse_replies(hs.data_to_send())) == info


def test_export_name_after_extended_headers_closes() -> None:
    hs = new()
    hs.receive_data(struct.pack("!I", 1) + option(Opt.EXTENDED_HEADERS))
    hs.data_to_send()
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert hs.state is HandshakeState.CLOSED and hs.negotiated is None
    assert hs.data_to_send() == b""


@given(data=st.binary(min_size=1, max_size=64))
def test_extended_headers_with_data_are_invalid_and_change_nothing(data: bytes) -> None:
    hs = new()
    hs.receive_data(
        struct.pack("!I", 1) + option(Opt.EXTENDED_HEADERS, data) + option(Opt.GO, info_data(b""))
    )
    replies = parse_replies(hs.data_to_send())
    assert replies[0][:2] == (Opt.EXTENDED_HEADERS, Rep.ERR_INVALID)
    assert hs.negotiated is not None and not hs.negotiated.extended
    assert not hs.negotiated.structured


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from(
            [
                option(Opt.EXTENDED_HEADERS),
                option(Opt.EXTENDED_HEADERS, b"x"),
                option(Opt.STRUCTURED_REPLY),
                option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:")),
                option(Opt.LIST_META_CONTEXT, meta_data(b"disk")),
                option(Opt.INFO, info_data(b"disk")),
                option(0x4242, b"?"),
            ]
        ),
        max_size=8,
    ),
    st.sampled_from([option(Opt.GO, info_data(b"disk")), option(Opt.EXPORT_NAME, b"disk")]),
)
def test_any_option_sequence_around_extended_headers_keeps_the_rules(
    before: list[bytes], last: bytes
) -> None:
    hs = new()
    hs.receive_data(struct.pack("!I", 3) + b"".join(before) + last)
    extended = option(Opt.EXTENDED_HEADERS) in before
    if last.startswith(option(Opt.EXPORT_NAME)[:12]) and extended:
        assert hs.state is HandshakeState.CLOSED and hs.negotiated is None
        return
    assert hs.state is HandshakeState.DONE and hs.negotiated is not None
    n = hs.negotiated
    assert n.extended is extended
    assert n.structured is (extended or option(Opt.STRUCTURED_REPLY) in before)
    assert bool(n.tx_flags & TxFlag.SEND_DF) is n.structured
    assert bool(n.tx_flags & TxFlag.BLOCK_STATUS_PAYLOAD) is (extended and bool(n.meta_contexts))


# -- STARTTLS (proto.md "TLS support") ------------------------------------------------------------

FIXED = struct.pack("!I", 1)


def tls_handshake(policy: TLSPolicy) -> ServerHandshake:
    hs = AnsweringHandshake(lookup, lambda: [EXPORT], tls=policy)
    hs.data_to_send()
    hs.receive_data(FIXED)
    return hs


def upgrade(hs: ServerHandshake) -> None:
    hs.receive_data(option(Opt.STARTTLS))
    assert parse_replies(hs.data_to_send()) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert hs.state is HandshakeState.STARTTLS
    hs.tls_started()
    state: HandshakeState = hs.state  # mypy: tls_started changes it
    assert state is HandshakeState.OPTIONS and hs.tls_active


def test_without_tls_starttls_is_unsupported_never_tls_reqd() -> None:
    hs = tls_handshake(TLSPolicy.OFF)
    hs.receive_data(option(Opt.STARTTLS))
    assert parse_replies(hs.data_to_send()) == [
        (Opt.STARTTLS, Rep.ERR_UNSUP, b"option 5 not supported")
    ]
    assert hs.state is HandshakeState.OPTIONS


@pytest.mark.parametrize(
    "opt",
    [Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT, 42, 0x7FFF],
)
def test_require_refuses_everything_before_tls_and_tells_nothing(opt: int) -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    data = info_data(b"disk", Info.NAME) if opt in (Opt.INFO, Opt.GO) else b""
    hs.receive_data(option(opt, data))
    out = hs.data_to_send()
    [(reply_opt, rep, _message)] = parse_replies(out)
    assert (reply_opt, rep) == (opt, Rep.ERR_TLS_REQD)
    assert struct.pack("!Q", EXPORT.size) not in out and b"disk" not in out
    assert hs.state is HandshakeState.OPTIONS and hs.negotiated is None


def test_require_refuses_an_oversized_option_with_tls_reqd() -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    hs.receive_data(option(Opt.INFO, bytes(70_000)))
    assert [rep for _o, rep, _d in parse_replies(hs.data_to_send())] == [Rep.ERR_TLS_REQD]


def test_require_closes_on_export_name_before_tls() -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert hs.state is HandshakeState.CLOSED
    assert hs.data_to_send() == b""  # no size, no flags
    assert hs.negotiated is None


def test_require_still_answers_abort() -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    hs.receive_data(option(Opt.ABORT))
    assert parse_replies(hs.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert hs.state is HandshakeState.CLOSED


@pytest.mark.parametrize("policy", [TLSPolicy.ON, TLSPolicy.REQUIRE])
def test_after_tls_the_export_is_served_and_tls_reqd_is_never_sent(policy: TLSPolicy) -> None:
    hs = tls_handshake(policy)
    upgrade(hs)
    hs.receive_data(option(Opt.LIST))
    assert [rep for _o, rep, _d in parse_replies(hs.data_to_send())] == [Rep.SERVER, Rep.ACK]
    hs.receive_data(option(Opt.GO, info_data(b"disk")))
    replies = parse_replies(hs.data_to_send())
    assert replies[-1][1] == Rep.ACK and hs.state is HandshakeState.DONE


@pytest.mark.parametrize("policy", [TLSPolicy.ON, TLSPolicy.REQUIRE])
def test_a_second_starttls_is_invalid(policy: TLSPolicy) -> None:
    hs = tls_handshake(policy)
    upgrade(hs)
    hs.receive_data(option(Opt.STARTTLS))
    assert [rep for _o, rep, _d in parse_replies(hs.data_to_send())] == [Rep.ERR_INVALID]
    assert hs.state is HandshakeState.OPTIONS


def test_starttls_with_data_is_invalid() -> None:
    hs = tls_handshake(TLSPolicy.ON)
    hs.receive_data(option(Opt.STARTTLS, b"x"))
    assert [rep for _o, rep, _d in parse_replies(hs.data_to_send())] == [Rep.ERR_INVALID]
    assert hs.state is HandshakeState.OPTIONS and not hs.tls_active


def test_on_serves_in_the_clear_too() -> None:
    hs = tls_handshake(TLSPolicy.ON)
    hs.receive_data(option(Opt.GO, info_data(b"disk")))
    assert parse_replies(hs.data_to_send())[-1][1] == Rep.ACK
    assert hs.state is HandshakeState.DONE and not hs.tls_active


def test_starttls_discards_what_was_negotiated_in_the_clear() -> None:
    hs = tls_handshake(TLSPolicy.ON)
    hs.receive_data(
        option(Opt.STRUCTURED_REPLY) + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:"))
    )
    hs.data_to_send()
    assert hs.structured
    upgrade(hs)
    hs.receive_data(option(Opt.GO, info_data(b"disk")))
    hs.data_to_send()
    assert hs.negotiated is not None
    assert not hs.negotiated.structured and hs.negotiated.meta_contexts == {}


def test_bytes_behind_starttls_wait_for_the_driver_to_hand_them_to_tls() -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    hs.receive_data(option(Opt.STARTTLS) + b"\x16\x03\x01hello")
    assert hs.state is HandshakeState.STARTTLS
    with pytest.raises(RuntimeError):
        hs.receive_data(b"more")
    assert hs.leftover() == b"\x16\x03\x01hello"


def test_shutdown_refuses_starttls() -> None:
    hs = tls_handshake(TLSPolicy.REQUIRE)
    hs.begin_shutdown()
    hs.receive_data(option(Opt.STARTTLS))
    assert [rep for _o, rep, _d in parse_replies(hs.data_to_send())] == [Rep.ERR_SHUTDOWN]


def test_oldstyle_cannot_have_tls() -> None:
    with pytest.raises(ValueError, match="oldstyle"):
        ServerHandshake(oldstyle=EXPORT, tls=TLSPolicy.ON)


# -- the events: the machine asks, the driver answers whenever it can ----------------------------

EVENT_STREAM = (
    struct.pack("!I", 3)
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.GO, info_data(b"disk"))
    + option(Opt.EXPORT_NAME, b"other")
    + b"\x25\x60\x95\x13rest"
)


@given(st.lists(st.integers(min_value=1, max_value=len(EVENT_STREAM)), max_size=8))
def test_any_chunking_asks_the_same_questions(cuts: list[int]) -> None:
    hs = ServerHandshake()
    asked = []
    start = 0
    for cut in [*sorted(set(cuts)), len(EVENT_STREAM)]:
        hs.receive_data(EVENT_STREAM[start:cut])
        start = cut
        while isinstance(hs.event, ExportRequested):
            asked.append(hs.event)
            if hs.event.option == Opt.GO:
                hs.refuse(Rep.ERR_UNKNOWN, "not started")  # the wrapper's failed start
            else:
                hs.provide_export(EXPORT)
    assert asked == [ExportRequested("disk", Opt.GO), ExportRequested("other", Opt.EXPORT_NAME)]
    replies = parse_replies(hs.data_to_send()[18:-10])  # no zeroes: a 10-byte answer
    assert [(opt, rep) for opt, rep, _ in replies] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.GO, Rep.ERR_UNKNOWN),
    ]
    # after EXPORT_NAME the rest is the first request, handed over as pending bytes
    assert hs.state is HandshakeState.DONE and hs.leftover() == EVENT_STREAM[-8:]


def test_bytes_sent_while_waiting_wait_for_the_answer() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(struct.pack("!I", 1) + option(Opt.INFO, info_data(b"disk")))
    assert hs.state is HandshakeState.WAITING and hs.data_to_send() == b""
    hs.receive_data(option(Opt.LIST))  # pipelined: kept until INFO is answered
    assert hs.data_to_send() == b"" and hs.event == ExportRequested("disk", Opt.INFO)
    hs.provide_export(EXPORT)
    assert isinstance(hs.event, ListRequested)
    hs.provide_list([EXPORT])
    replies = parse_replies(hs.data_to_send())
    assert [(opt, rep) for opt, rep, _ in replies] == [
        (Opt.INFO, Rep.INFO),
        (Opt.INFO, Rep.INFO),
        (Opt.INFO, Rep.ACK),
        (Opt.LIST, Rep.SERVER),
        (Opt.LIST, Rep.ACK),
    ]
    state: HandshakeState = hs.state  # mypy: the answers change it
    assert state is HandshakeState.OPTIONS


def test_refusals_and_unknown_exports() -> None:
    hs = ServerHandshake()
    hs.receive_data(struct.pack("!I", 1) + option(Opt.GO, info_data(b"gone")))
    hs.provide_export(None)
    hs.receive_data(option(Opt.INFO, info_data(b"disk")))
    hs.refuse(Rep.ERR_UNKNOWN, "export 'disk' is not available")
    replies = parse_replies(hs.data_to_send()[18:])
    assert replies == [
        (Opt.GO, Rep.ERR_UNKNOWN, b"no export named 'gone'"),
        (Opt.INFO, Rep.ERR_UNKNOWN, b"export 'disk' is not available"),
    ]
    # EXPORT_NAME has no error reply: a refusal closes
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    hs.refuse(Rep.ERR_UNKNOWN, "start failed")
    assert hs.state is HandshakeState.CLOSED and hs.close_reason == "start failed"
    assert hs.data_to_send() == b""


def test_answers_without_a_question_are_errors() -> None:
    hs = ServerHandshake()
    with pytest.raises(RuntimeError):
        hs.provide_export(EXPORT)
    hs.receive_data(struct.pack("!I", 1) + option(Opt.LIST))
    with pytest.raises(RuntimeError):
        hs.provide_export(EXPORT)  # LIST wants provide_list
    hs.provide_list([])
    assert hs.state is HandshakeState.OPTIONS


def test_oversized_option_is_skipped_in_pieces_without_a_question() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(b"\0\0\0\1" + struct.pack("!QII", IHAVEOPT, Opt.GO, MAX_OPTION_DATA + 1))
    hs.receive_data(b"x" * 1000)
    assert hs.state is HandshakeState.OPTIONS and hs.event is None
    assert hs.data_to_send() == b""
    hs.receive_data(bytes(MAX_OPTION_DATA + 1 - 1000))
    assert parse_replies(hs.data_to_send()) == [(Opt.GO, Rep.ERR_TOO_BIG, b"")]


def test_malformed_names_get_no_question() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(b"\0\0\0\1" + option(Opt.GO, b"\0\0"))
    assert hs.event is None
    assert parse_replies(hs.data_to_send())[0][:2] == (Opt.GO, Rep.ERR_INVALID)
    hs.receive_data(option(Opt.EXPORT_NAME, b"\xff"))
    assert hs.event is None and hs.state is HandshakeState.CLOSED


def test_simple_only_refuses_structured_replies_with_its_reason() -> None:
    hs = AnsweringHandshake(lookup, lambda: [EXPORT], simple_only="structured replies need X")
    hs.receive_data(struct.pack("!I", 1) + option(Opt.STRUCTURED_REPLY))
    hs.receive_data(option(Opt.EXTENDED_HEADERS) + option(Opt.GO, info_data(b"disk")))
    replies = parse_replies(hs.data_to_send()[18:])
    assert replies[0] == (Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"structured replies need X")
    assert replies[1] == (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP, b"structured replies need X")
    assert hs.negotiated is not None and not hs.negotiated.structured
    assert not hs.negotiated.tx_flags & TxFlag.SEND_DF


def test_oldstyle_advertises_no_send_df() -> None:
    # SEND_DF without structured replies breaks a MUST; oldstyle has simple replies only
    hs = ServerHandshake(oldstyle=replace(EXPORT, tx_flags=EXPORT.tx_flags | TxFlag.SEND_DF))
    (flags,) = struct.unpack_from("!I", hs.data_to_send(), 24)
    assert not flags & TxFlag.SEND_DF
    assert hs.negotiated is not None and not hs.negotiated.tx_flags & TxFlag.SEND_DF
