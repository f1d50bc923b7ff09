"""A deliberately small, independent NBD client over a raw socket, for tests that must send what
well-behaved clients never send. It shares no code with xnbdd, so it checks the server against
the spec rather than against itself."""

from __future__ import annotations

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
ERR_UNKNOWN, ERR_SHUTDOWN, ERR_TOO_BIG = 0x80000006, 0x80000007, 0x80000009

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 22, 28, 75, 95, 108


class Closed(Exception):
    pass


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout)
        self.greeting = self.recv(18)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: large READ data without a new buffer per chunk."""
        total = len(view)
        while len(view):
            count = self.sock.recv_into(view)
            if not count:
                raise Closed(f"connection closed after {total - len(view)} of {total} bytes")
            view = view[count:]

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (and sent nothing more)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake ------------------------------------------------------------------------------

    def client_flags(self, flags: int) -> None:
        self.send(struct.pack("!I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack("!QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack("!QIII", self.recv(20))
        assert magic == REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        """Replies up to and including the ACK or error that ends this option."""
        out = []
        while True:
            item = self.reply()
            out.append(item)
            if item[1] == REP_ACK or item[1] & 0x80000000:
                return out

    @staticmethod
    def info_data(name: str, *infos: int) -> bytes:
        raw = name.encode()
        types = struct.pack(f"!H{len(infos)}H", len(infos), *infos)
        return struct.pack("!I", len(raw)) + raw + types

    @staticmethod
    def meta_data(name: str, *queries: str) -> bytes:
        raw = name.encode()
        out = struct.pack("!I", len(raw)) + raw + struct.pack("!I", len(queries))
        for q in queries:
            out += struct.pack("!I", len(q.encode())) + q.encode()
        return out

    def go(
        self,
        name: str = "",
        *,
        structured: bool = False,
        contexts: tuple[str, ...] = (),
        send_flags: bool = True,
    ) -> tuple[int, int]:
        """Fixed newstyle up to transmission; returns (size, transmission flags)."""
        if send_flags:
            self.client_flags(3)
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.reply()[1] == REP_ACK
        if contexts:
            self.option(OPT_SET_META_CONTEXT, self.meta_data(name, *contexts))
            self.replies_until_final()
        self.option(OPT_GO, self.info_data(name))
        size = flags = -1
        for _opt, rep, data in self.replies_until_final():
            if rep == REP_INFO and struct.unpack_from("!H", data)[0] == 0:
                size, flags = struct.unpack_from("!QH", data, 2)
            assert not rep & 0x80000000, hex(rep)
        return size, flags

    # -- transmission ---------------------------------------------------------------------------

    @staticmethod
    def encode_request(
        cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1
    ) -> bytes:
        """One request header, for tests that send many requests in one go."""
        return struct.pack("!IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> None:
        self.send(struct.pack("!IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data only follows a successful READ."""
        magic, error, cookie = struct.unpack("!IIQ", self.recv(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return error, cookie, self.recv(read_length) if error == 0 and read_length else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, kind, cookie, length = struct.unpack("!IHHQI", self.recv(20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return flags, kind, cookie, self.recv(length)

    def structured_reply(self) -> list[tuple[int, int, int, bytes]]:
        chunks = []
        while True:
            chunk = self.chunk()
            chunks.append(chunk)
            if chunk[0] & 1:
                return chunks
