"""What the fuzzer sends: NBD handshakes and requests, well-formed ones and their mutations.

Independent of xnbdd (like tests/rawnbd.py): the bytes are built from the protocol's numbers,
so the fuzzer checks the server against the wire, not against its own encoder.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from tests import rawnbd

IHAVEOPT = rawnbd.IHAVEOPT
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # with NBD_OPT_EXTENDED_HEADERS: 64-bit lengths
OPT_EXTENDED_HEADERS = 11
FLAG_PAYLOAD_LEN = 1 << 5  # extended headers: the length is a payload's (WRITE-like commands)
OPTIONS = list(range(0, 13))  # every option the spec knows (and 0, 12: unknown ones)
COMMANDS = list(range(0, 10))  # every command (8 RESIZE, 9: unknown)
INFO_TYPES = [0, 1, 2, 3, 4, 0xFFFF]
CONTEXTS = ["base:allocation", "x-xnbd:cached", "base:", "", "qemu:dirty-bitmap:x", "a" * 300]
BIG = [0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 4097, 65536, 1 << 20, 32 << 20, (32 << 20) + 1]
BIG64 = [1 << 32, (1 << 32) + 4096, 1 << 40, 1 << 63, (1 << 64) - 1]  # only extended headers


def header(extended: bool, flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    """A request header, compact (32-bit length) or extended (64-bit length)."""
    if extended:
        return struct.pack("!IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return struct.pack("!IHHQQI", rawnbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass
class Target:
    """The export under fuzz: its name, size, and whether writes are allowed."""

    name: str
    size: int
    writable: bool


def _u32(n: int) -> bytes:
    return struct.pack("!I", n & 0xFFFFFFFF)


def _string(rng: random.Random, target: Target) -> bytes:
    choice = rng.randrange(8)
    if choice == 0:
        return b""
    if choice == 1:
        return rng.randbytes(rng.randrange(1, 64))
    if choice == 2:
        return b"../" * rng.randrange(1, 20) + b"etc/passwd"
    if choice == 3:
        return b"\xff\xfe" + rng.randbytes(8)  # not UTF-8
    if choice == 4:
        return b"a" * rng.choice([4096, 4097, 70000])
    return target.name.encode()


def option_data(rng: random.Random, opt: int, target: Target) -> bytes:
    """Plausible data for ``opt`` (often valid, sometimes subtly not)."""
    name = _string(rng, target)
    if opt in (6, 7):  # INFO, GO: name, count, info types
        infos = [rng.choice(INFO_TYPES) for _ in range(rng.randrange(0, 5))]
        count = len(infos) if rng.random() < 0.8 else rng.randrange(0, 70000)
        return (
            _u32(len(name))
            + name
            + struct.pack("!H", count & 0xFFFF)
            + b"".join(struct.pack("!H", i) for i in infos)
        )
    if opt in (9, 10):  # LIST/SET_META_CONTEXT: name, count, queries
        queries = [rng.choice(CONTEXTS).encode() for _ in range(rng.randrange(0, 4))]
        count = len(queries) if rng.random() < 0.8 else rng.choice(BIG)
        body = b"".join(_u32(len(q)) + q for q in queries)
        return _u32(len(name)) + name + _u32(count) + body
    if opt == 1:  # EXPORT_NAME: the name alone
        return name
    if rng.random() < 0.7:
        return b""  # LIST, STARTTLS, STRUCTURED_REPLY, ABORT, EXTENDED_HEADERS take none
    return rng.randbytes(rng.randrange(1, 32))


def valid_handshake(
    rng: random.Random, target: Target, *, structured: bool, extended: bool = False
) -> bytes:
    """Client flags, optionally STRUCTURED_REPLY or EXTENDED_HEADERS (which implies structured
    replies), then GO for the export: a correct client."""
    out = _u32(3)  # FIXED_NEWSTYLE | NO_ZEROES
    if structured or extended:
        out += struct.pack("!QII", IHAVEOPT, OPT_EXTENDED_HEADERS if extended else 8, 0)
        if rng.random() < 0.5:
            query = b"base:allocation"
            data = (
                _u32(len(target.name)) + target.name.encode() + _u32(1) + _u32(len(query)) + query
            )
            out += struct.pack("!QII", IHAVEOPT, 10, len(data)) + data
    name = target.name.encode()
    data = _u32(len(name)) + name + struct.pack("!H", 0)
    return out + struct.pack("!QII", IHAVEOPT, 7, len(data)) + data


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits: bit flips, byte values, inserted or deleted runs, a cut, a length
    field or magic replaced, a slice repeated."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        kind = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == 2:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 3 and buf:
            del buf[pos : pos + rng.randrange(1, 16)]
        elif kind == 4:
            del buf[pos:]  # truncated
        elif kind == 5 and len(buf) >= 4:
            i = rng.randrange(len(buf) - 3)
            buf[i : i + 4] = _u32(rng.choice(BIG))
        elif kind == 6 and len(buf) >= 8:
            i = rng.randrange(len(buf) - 7)
            buf[i : i + 8] = rng.choice([b"\0" * 8, b"\xff" * 8, struct.pack("!Q", IHAVEOPT)])
        elif buf:
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randrange(1, 64)]
            buf[pos:pos] = piece * rng.randrange(1, 4)
    return bytes(buf)


def handshake_input(rng: random.Random, target: Target) -> bytes:
    """One hostile handshake: random options (every kind, STARTTLS and repeated GO among them),
    often mutated afterwards; sometimes requests pipelined behind a valid GO."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))  # noise, bad magics
    out = _u32(rng.choice([3, 3, 3, 1, 0, 2, 4, 0xFFFFFFFF]))
    for _ in range(rng.randrange(1, 8)):
        opt = rng.choice(OPTIONS) if rng.random() < 0.95 else rng.randrange(1 << 32)
        data = option_data(rng, opt, target)
        length = len(data) if rng.random() < 0.9 else rng.choice(BIG)
        out += struct.pack("!QII", IHAVEOPT, opt, length) + data
    if kind == 1:  # repeated GO, requests behind it
        go = valid_handshake(rng, target, structured=rng.random() < 0.5)[4:]
        out += go * rng.randrange(1, 3)
        out += b"".join(request_bytes(rng, target, cookie)[0] for cookie in range(1, 5))
    if rng.random() < 0.6:
        out = mutate(rng, out)
    return out


# -- transmission ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """What was asked, to frame its reply: the command and the length a READ returns."""

    cmd: int
    length: int


@dataclass
class Session:
    """Requests for one connection after a valid GO, and how the session ends."""

    handshake: bytes
    structured: bool
    extended: bool  # extended headers: 64-bit request lengths, extended reply chunks only
    requests: list[bytes] = field(default_factory=list)
    sent: dict[int, Sent] = field(default_factory=dict)  # cookie -> request
    ending: str = "sentinel"  # sentinel | close | garbage | short-payload | disc
    tail: bytes = b""  # what goes after the requests for the endings that are not "sentinel"


def _offset_length(rng: random.Random, size: int, extended: bool) -> tuple[int, int]:
    pick = rng.randrange(11 if extended else 10)
    if pick == 10:
        return rng.choice([0, size - 1, rng.randrange(size)]), rng.choice(BIG64)
    if pick < 4:
        offset = rng.randrange(size)
        return offset, rng.randrange(1, min(size - offset, 256 * 1024) + 1)
    if pick == 4:
        return size - 1, rng.choice([1, 2, 4096])
    if pick == 5:
        return size, rng.choice([0, 1, 4096])
    if pick == 6:
        return rng.choice([size + 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096]), 4096
    if pick == 7:
        return 0, rng.choice([0, size, size + 1, 0xFFFFFFFF, 32 << 20, (32 << 20) + 1])
    if pick == 8:
        return rng.randrange(size) & ~4095, 4096
    return rng.randrange(1 << 64), rng.randrange(1 << 32)


def request_bytes(
    rng: random.Random, target: Target, cookie: int, extended: bool = False
) -> tuple[bytes, Sent]:
    """One request: any command with random flags, offsets and lengths at and past the end
    (with extended headers, lengths past 32 bits too); a WRITE's payload is sent whole when it
    is small enough to send (never past the guard)."""
    cmd = rng.choice(COMMANDS) if rng.random() < 0.97 else rng.randrange(1 << 16)
    flags = rng.choice([0, 0, 0, 1, 2, 4, 8, 16, 32, rng.randrange(1 << 16)])
    if extended and cmd != rawnbd.CMD_WRITE:
        # the flag makes the length a payload's, which this request does not carry: the
        # framing would be the fuzzer's own mistake, not the server's
        flags &= ~FLAG_PAYLOAD_LEN
    offset, length = _offset_length(rng, target.size, extended)
    payload = b""
    if cmd == rawnbd.CMD_WRITE:
        if length > 1 << 20:  # the server refuses or drains it; do not send megabytes of it
            length = rng.randrange(1, 64 * 1024)
        payload = rng.randbytes(min(length, 64)) * (length // 64 + 1)
        payload = payload[:length]
    return header(extended, flags, cmd, cookie, offset, length) + payload, Sent(cmd, length)


def session(rng: random.Random, target: Target, first_cookie: int) -> Session:
    kind = rng.randrange(3)  # simple, structured or extended replies
    structured, extended = kind > 0, kind == 2
    handshake = valid_handshake(rng, target, structured=structured, extended=extended)
    s = Session(handshake, structured, extended)
    flood = rng.random() < 0.02
    count = rng.randrange(300, 1200) if flood else rng.randrange(1, 24)
    cookie = first_cookie
    for _ in range(count):
        if flood:  # past the queue and byte budgets: READs of up to 1 MiB, pipelined
            length = rng.choice([4096, 65536, 1 << 20])
            offset = rng.randrange(max(1, target.size - length)) if length < target.size else 0
            length = min(length, target.size)
            wire = header(extended, 0, rawnbd.CMD_READ, cookie, offset, length)
            sent = Sent(rawnbd.CMD_READ, length)
        else:
            wire, sent = request_bytes(rng, target, cookie, extended)
        if sent.cmd == rawnbd.CMD_DISC:
            cookie += 1
            continue  # DISC is an ending of its own
        s.requests.append(wire)
        s.sent[cookie] = sent
        cookie += 1
    pick = rng.randrange(20)
    if pick == 0:
        s.ending = "close"
    elif pick == 1:
        s.ending, s.tail = "garbage", rng.randbytes(rng.randrange(1, 100))
    elif pick == 2:  # a WRITE whose payload never comes whole
        length = rng.choice([4096, 65536, 1 << 20, 300 << 20])
        s.ending = "short-payload"
        s.tail = header(extended, 0, rawnbd.CMD_WRITE, cookie, 0, length)
        s.tail += b"\x00" * min(length // 2, 8192)
    elif pick == 3:
        s.ending = "disc"
        s.tail = header(extended, 0, rawnbd.CMD_DISC, cookie, 0, 0)
    return s
