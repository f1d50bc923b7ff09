"""The sans-IO server handshake, driven byte by byte and by Hypothesis over options."""

from __future__ import annotations

import struct

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
from xnbdd.proto.handshake import HandshakeState, ServerHandshake, select_contexts
from xnbdd.proto.messages import ExportInfo

EXPORT = ExportInfo(
    name="disk",
    size=1 << 20,
    tx_flags=TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_DF,
    description="a disk",
    meta_contexts=("base:allocation", "x-xnbd:cached"),
)


def lookup(name: str) -> ExportInfo | None:
    return EXPORT if name in ("", "disk") else None


def new() -> ServerHandshake:
    hs = ServerHandshake(lookup, lambda: [EXPORT])
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

    hs = ServerHandshake(two, lambda: [EXPORT, other])
    hs.receive_data(
        struct.pack("!I", 1)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data(b"disk", b"base:allocation"))
        + option(Opt.GO, info_data(b"other"))
    )
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == {}


def test_oldstyle_greeting_is_152_bytes_and_goes_straight_to_transmission() -> None:
    hs = ServerHandshake(lookup, lambda: [EXPORT], oldstyle=True)
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
