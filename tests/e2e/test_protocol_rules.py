"""The numbered server rules of docs/protocol-rules.md, checked over a raw socket against the real
daemon. Each test names its rule."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawnbd import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    ERR_INVALID,
    ERR_SHUTDOWN,
    ERR_TOO_BIG,
    ERR_UNKNOWN,
    ERR_UNSUP,
    FLAG_DF,
    FLAG_FUA,
    FLAG_REQ_ONE,
    IHAVEOPT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    RawClient,
)
from tests.serverproc import ServerProcess, running_server

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("rules")
    image = tmp / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    with running_server(
        "--target", str(image), "--exportname", "disk", "--handshake-timeout", "2", tmp_path=tmp
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def readonly_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("rules-ro")
    image = tmp / "disk.img"
    image.write_bytes(b"x" * SIZE)
    with running_server("--target", str(image), "--readonly", tmp_path=tmp) as srv:
        yield srv


_open_clients: list[RawClient] = []


def client(srv: ServerProcess) -> RawClient:
    """A raw client of ``srv``, closed when the test ends (``close_clients``)."""
    c = RawClient(srv.port)
    _open_clients.append(c)
    return c


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _open_clients:
        _open_clients.pop().close()


# -- handshake ----------------------------------------------------------------------------------


def test_rule01_greeting_offers_fixed_newstyle_and_no_zeroes(server: ServerProcess) -> None:
    c = client(server)
    assert struct.unpack("!QQH", c.greeting) == (NBDMAGIC, IHAVEOPT, 0x0003)


def test_rule02_unknown_client_flags_close_the_connection(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(0x4)
    assert c.at_eof(timeout=1)  # at once, not after the 2 s handshake timeout


def test_rule03_non_fixed_client_gets_export_name_answer_with_zeroes(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(0)
    c.option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack("!QH", c.recv(10))
    assert size == SIZE and flags & 1
    assert c.recv(124) == bytes(124)
    c.request(CMD_READ, 0, 512, cookie=7)
    assert c.simple_reply(512) == (0, 7, bytes(512))


def test_rule04_no_zeroes_makes_the_answer_ten_bytes(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(3)
    c.option(OPT_EXPORT_NAME, b"disk")
    size, _flags = struct.unpack("!QH", c.recv(10))
    assert size == SIZE
    c.request(CMD_READ, 0, 16, cookie=9)  # the next bytes are the reply, not padding
    assert c.simple_reply(16)[:2] == (0, 9)


def test_rule06_unknown_option_is_unsupported_and_negotiation_goes_on(
    server: ServerProcess,
) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(0x7654321, b"some data")
    opt, rep, _message = c.reply()
    assert (opt, rep) == (0x7654321, ERR_UNSUP)
    c.option(OPT_ABORT)
    assert c.reply()[:2] == (OPT_ABORT, REP_ACK)
    assert c.at_eof()


def test_rule07_abort_without_waiting_is_not_an_error(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_ABORT, b"ignored")
    c.close()
    time.sleep(0.2)
    assert "Traceback" not in server.log() and "ERROR" not in server.log()


def test_rule08_list_and_list_with_data(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_LIST)
    replies = c.replies_until_final()
    servers = [data for _o, rep, data in replies if rep == REP_SERVER]
    assert len(servers) == 1 and servers[0][4:8] == b"disk"
    assert replies[-1][1] == REP_ACK
    c.option(OPT_LIST, b"junk")
    assert c.reply()[1] == ERR_INVALID


def test_rule09_export_name_unknown_closes_without_data(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_EXPORT_NAME, b"no-such-export")
    assert c.at_eof()


def test_rule10_info_and_go_unknown_export(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    for opt in (OPT_INFO, OPT_GO):
        c.option(opt, RawClient.info_data("nope"))
        replies = c.replies_until_final()
        assert [rep for _o, rep, _d in replies] == [ERR_UNKNOWN]
    assert c.go("disk", send_flags=False)[0] == SIZE  # negotiation continued


def test_rule11_to_13_info_then_go_same_answer_and_unknown_infos_ignored(
    server: ServerProcess,
) -> None:
    c = client(server)
    c.client_flags(1)
    answers = []
    for opt in (OPT_INFO, OPT_GO):
        c.option(opt, RawClient.info_data("disk", 1, 2, 3, 0x999))
        replies = c.replies_until_final()
        assert replies[-1][1] == REP_ACK
        infos = {struct.unpack_from("!H", d)[0]: d for _o, rep, d in replies if rep == REP_INFO}
        assert len(infos[0]) == 12
        assert infos[1][2:] == b"disk"
        assert struct.unpack("!HIII", infos[3]) == (3, 1, 4096, 32 * MiB)
        answers.append(infos[0])
    assert answers[0] == answers[1]
    c.request(CMD_READ, 0, 8, cookie=3)  # transmission right after GO's ACK, no padding
    assert c.simple_reply(8)[:2] == (0, 3)


def test_rule14_bad_lengths_in_info(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_GO, struct.pack("!I", 100) + b"disk" + struct.pack("!H", 0))
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_GO, RawClient.info_data("disk", 1)[:-1])  # count says 1, no type follows
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_GO, b"\0\0")
    assert c.reply()[1] == ERR_INVALID


def test_rule16_17_structured_reply_and_meta_contexts(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_LIST_META_CONTEXT, RawClient.meta_data("disk", "base:"))
    assert c.reply()[1] == ERR_INVALID  # before structured replies
    c.option(OPT_STRUCTURED_REPLY, b"x")
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_STRUCTURED_REPLY)
    assert c.reply()[1] == REP_ACK
    c.option(OPT_LIST_META_CONTEXT, RawClient.meta_data("disk", "base:"))
    replies = c.replies_until_final()
    assert [d[4:] for _o, rep, d in replies if rep == REP_META_CONTEXT] == [b"base:allocation"]
    c.option(OPT_LIST_META_CONTEXT, RawClient.meta_data("disk", "qemu:dirty-bitmap:x"))
    assert [rep for _o, rep, _d in c.replies_until_final()] == [REP_ACK]  # unknown: ignored
    c.option(OPT_SET_META_CONTEXT, RawClient.meta_data("disk"))
    assert [rep for _o, rep, _d in c.replies_until_final()] == [REP_ACK]  # selects nothing
    c.option(OPT_SET_META_CONTEXT, RawClient.meta_data("disk", "base:allocation")[:-3])
    assert c.reply()[1] == ERR_INVALID


def test_rule18_starttls_is_unsupported(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_STARTTLS)
    assert c.reply()[1] == ERR_UNSUP


def test_rule19_bad_strings(server: ServerProcess) -> None:
    c = client(server)
    c.client_flags(1)
    c.option(OPT_GO, RawClient.info_data("x" * 5000))
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_GO, struct.pack("!I", 2) + b"\xff\xfe" + struct.pack("!H", 0))
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_GO, struct.pack("!I", 2) + b"a\0" + struct.pack("!H", 0))
    assert c.reply()[1] == ERR_INVALID
    c.option(OPT_INFO, bytes(70000))  # far beyond any legitimate option: skipped
    assert c.reply()[1] == ERR_TOO_BIG
    assert c.go("disk", send_flags=False)[0] == SIZE


def test_rule21_stalled_client_is_cut_and_delays_nobody(server: ServerProcess) -> None:
    stalled = client(server)
    other = client(server)
    assert other.go("disk")[0] == SIZE
    assert stalled.at_eof(timeout=6)  # --handshake-timeout 2


# -- transmission -------------------------------------------------------------------------------


def test_rule22_flags(server: ServerProcess) -> None:
    c = client(server)
    _size, flags = c.go("disk")
    assert flags & 1  # HAS_FLAGS
    assert not flags & (1 << 7)  # SEND_DF only with structured replies
    c2 = client(server)
    _size, flags2 = c2.go("disk", structured=True)
    assert flags2 & (1 << 7)


def test_rule23_bad_magic_closes(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    c.send(struct.pack("!IHHQQI", 0x12345678, 0, CMD_READ, 1, 0, 512))
    assert c.at_eof()


def test_rule24_to_26_cookies_unknown_commands_and_flags(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    rng = random.Random(24)
    for cmd, flags, want in [
        (99, 0, EINVAL),
        (CMD_READ, 0x80, EINVAL),
        (CMD_WRITE, FLAG_DF, EINVAL),
        (CMD_READ, FLAG_DF, EINVAL),
        (CMD_READ, FLAG_FUA, 0),
    ]:
        cookie = rng.getrandbits(64)
        payload = bytes(512) if cmd == CMD_WRITE else b""
        c.request(cmd, 0, 512, flags=flags, cookie=cookie, data=payload)
        error, got, _data = c.simple_reply(512)
        assert (error, got) == (want, cookie), (cmd, flags)


def test_rule27_out_of_range(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk", structured=True, contexts=("base:allocation",))
    cases = [
        (CMD_READ, SIZE - 100, 512, EINVAL),
        (CMD_READ, 2**64 - 256, 512, EINVAL),
        (CMD_TRIM, SIZE, 1, EINVAL),
        (CMD_CACHE, SIZE - 1, 2, EINVAL),
        (CMD_BLOCK_STATUS, 2**63, 4096, EINVAL),
        (CMD_WRITE_ZEROES, SIZE - 1, 2, ENOSPC),
        (CMD_WRITE, 2**64 - 1, 16, ENOSPC),
    ]
    for cookie, (cmd, offset, length, want) in enumerate(cases):
        payload = bytes(length) if cmd == CMD_WRITE else b""
        c.request(cmd, offset, length, cookie=cookie, data=payload)
        (flags, kind, got, body) = c.chunk()
        assert flags & 1 and kind in (0x8001, 0x8002) and got == cookie
        assert struct.unpack_from("!I", body)[0] == want, cases[cookie]


def test_rule28_rejected_write_payload_is_consumed(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    c.request(CMD_WRITE, SIZE - 10, 4096, cookie=1, data=b"\xee" * 4096)
    assert c.simple_reply()[:2] == (ENOSPC, 1)
    c.request(CMD_WRITE, 0, 4096, flags=0x40, cookie=2, data=b"\xee" * 4096)
    assert c.simple_reply()[:2] == (EINVAL, 2)
    c.request(CMD_READ, 0, 4096, cookie=3)
    error, cookie, data = c.simple_reply(4096)
    assert (error, cookie) == (0, 3) and b"\xee" not in data


def test_rule29_read_only_export_refuses_writes_with_eperm(readonly_server: ServerProcess) -> None:
    c = client(readonly_server)
    _size, flags = c.go()
    assert flags & 2  # READ_ONLY
    c.request(CMD_WRITE, 0, 512, cookie=1, data=b"y" * 512)
    assert c.simple_reply()[:2] == (EPERM, 1)
    c.request(CMD_TRIM, 0, 512, cookie=2)
    assert c.simple_reply()[0] in (EPERM, EINVAL)  # TRIM is not even advertised
    c.request(CMD_READ, 0, 512, cookie=3)
    assert c.simple_reply(512) == (0, 3, b"x" * 512)


def test_rule30_payload_limits(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    c.request(CMD_READ, 0, SIZE, cookie=1)  # the whole 4 MiB export in one READ
    assert len(c.simple_reply(SIZE)[2]) == SIZE
    c.request(CMD_READ, 0, 64 * MiB + 1, cookie=2)  # 32 MiB advertised, 64 MiB accepted
    assert c.simple_reply()[:2] == (EINVAL, 2)
    c.request(CMD_WRITE, 0, 64 * MiB + 1, cookie=3, data=b"z" * (64 * MiB + 1))
    assert c.simple_reply()[:2] == (EINVAL, 3)  # drained, still in step
    c.request(CMD_READ, 0, 16, cookie=4)
    assert c.simple_reply(16) == (0, 4, bytes(16))
    c.request(CMD_WRITE, 0, 2**31, cookie=5)  # 2 GiB promised: denial of service
    assert c.at_eof()


def test_rule32_33_zero_length_requests_and_flush_arguments(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    for cookie, cmd in enumerate((CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES)):
        for offset in (0, SIZE):
            c.request(cmd, offset, 0, cookie=cookie)
            assert c.simple_reply() == (0, cookie, b"")
    c.request(CMD_FLUSH, 0, 0, cookie=10)
    assert c.simple_reply()[:2] == (0, 10)
    c.request(CMD_FLUSH, 4096, 0, cookie=11)
    assert c.simple_reply()[:2] == (EINVAL, 11)


def test_rule35_structured_read_and_df(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk", structured=True)
    c.request(CMD_WRITE, 8192, 4096, cookie=1, data=b"q" * 4096)
    assert c.simple_reply()[:2] == (0, 1)
    c.request(CMD_READ, 8192, 65536, flags=FLAG_DF, cookie=2)
    chunks = c.structured_reply()
    data_chunks = [ch for ch in chunks if ch[1] == 1]
    assert len(data_chunks) == 1 and chunks[-1][0] & 1
    body = data_chunks[0][3]
    assert struct.unpack_from("!Q", body)[0] == 8192
    assert body[8:] == b"q" * 4096 + bytes(65536 - 4096)


def test_rule42_block_status(server: ServerProcess) -> None:
    plain = client(server)
    plain.go("disk", structured=True)
    plain.request(CMD_BLOCK_STATUS, 0, 4096, cookie=1)
    assert struct.unpack_from("!I", plain.chunk()[3])[0] == EINVAL  # no context selected
    c = client(server)
    c.go("disk", structured=True, contexts=("base:allocation",))
    c.request(CMD_BLOCK_STATUS, 0, SIZE, flags=FLAG_REQ_ONE, cookie=2)
    flags, kind, cookie, body = c.chunk()
    assert (flags & 1, kind, cookie) == (1, 5, 2)
    context_id, *pairs = struct.unpack(f"!I{(len(body) - 4) // 4}I", body)
    assert context_id == 1 and len(pairs) == 2 and 0 < pairs[0] <= SIZE
    c.request(CMD_BLOCK_STATUS, 0, SIZE, cookie=3)
    body = c.chunk()[3]
    pairs = list(struct.unpack(f"!{(len(body) - 4) // 4}I", body[4:]))
    assert sum(pairs[0::2]) <= SIZE and all(pairs[0::2])


def test_rule46_disc_finishes_outstanding_writes(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    blob = os.urandom(65536)
    for i in range(16):
        c.request(CMD_WRITE, 1 * MiB + i * 65536, 65536, cookie=i, data=blob)
    c.request(CMD_DISC, cookie=99)
    replies = [c.simple_reply()[:2] for _ in range(16)]
    assert sorted(cookie for _e, cookie in replies) == list(range(16))
    assert all(error == 0 for error, _c in replies)
    assert c.at_eof()  # nothing answers DISC
    check = client(server)
    check.go("disk")
    check.request(CMD_READ, 1 * MiB, 16 * 65536, cookie=1)
    assert check.simple_reply(16 * 65536)[2] == blob * 16


def test_rule47_client_vanishing_mid_request_harms_nobody(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    c.request(CMD_WRITE, 0, 65536, cookie=1, data=b"w" * 1000)  # payload cut short
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    other = client(server)
    other.go("disk")
    other.request(CMD_READ, 0, 16, cookie=2)
    assert other.simple_reply(16)[:2] == (0, 2)


def test_rule44_64_requests_in_flight_on_one_connection(server: ServerProcess) -> None:
    c = client(server)
    c.go("disk")
    for i in range(64):
        c.request(CMD_WRITE, 2 * MiB + i * 4096, 4096, cookie=1000 + i, data=bytes([i]) * 4096)
    cookies = sorted(c.simple_reply()[1] for _ in range(64))
    assert cookies == list(range(1000, 1064))
    for i in range(64):
        c.request(CMD_READ, 2 * MiB + i * 4096, 4096, cookie=i)
    seen = {}
    for _ in range(64):
        error, cookie, data = c.simple_reply(4096)
        seen[cookie] = (error, data)
    assert all(seen[i] == (0, bytes([i]) * 4096) for i in range(64))


def test_rule20_shutdown_during_negotiation(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    with running_server("--target", str(image), tmp_path=tmp_path) as srv:
        c = client(srv)
        c.client_flags(1)
        srv.proc.send_signal(15)
        time.sleep(0.5)
        c.option(OPT_LIST)
        assert c.reply()[1] == ERR_SHUTDOWN
        c.option(OPT_ABORT)
        assert c.reply()[1] == REP_ACK


def test_rule35_holes_of_a_memory_file_system_are_sent_as_hole_chunks(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    image = shm / f"xnbdd-holes-{os.getpid()}.img"
    try:
        with open(image, "wb") as f:
            f.truncate(SIZE)
            f.seek(MiB)
            f.write(b"d" * 65536)
        with running_server("--target", str(image), tmp_path=tmp_path) as srv:
            c = client(srv)
            c.go(structured=True)
            c.request(CMD_READ, 2 * MiB, MiB, cookie=1)  # all hole
            (chunk,) = c.structured_reply()
            assert chunk[:3] == (1, 2, 1)  # DONE, OFFSET_HOLE, cookie
            assert struct.unpack("!QI", chunk[3]) == (2 * MiB, MiB)
            c.request(CMD_READ, MiB, 65536, cookie=2)  # data
            (chunk,) = c.structured_reply()
            assert chunk[1] == 1 and chunk[3][8:] == b"d" * 65536
            c.request(CMD_READ, MiB - 65536, 131072, cookie=3)  # hole, then data: sent as data
            (chunk,) = c.structured_reply()
            assert chunk[1] == 1 and chunk[3][8:] == bytes(65536) + b"d" * 65536
            c.request(CMD_WRITE, 3 * MiB, 65536, cookie=4, data=b"w" * 65536)
            assert c.simple_reply()[:2] == (0, 4)
            c.request(CMD_READ, 3 * MiB, 65536, cookie=5)  # a hole no more once written
            (chunk,) = c.structured_reply()
            assert chunk[1] == 1 and chunk[3][8:] == b"w" * 65536
    finally:
        image.unlink(missing_ok=True)
