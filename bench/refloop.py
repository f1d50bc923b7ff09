#!/usr/bin/env python3
"""Reference loop (not a product): about the least a Python NBD server can do per request.

A yardstick for bench/run.py, not a server to use: fixed-newstyle handshake (GO/INFO/EXPORT_NAME,
any export name; everything else refused with ERR_UNSUP, so libnbd falls back to simple replies),
then one blocking thread per connection: one recv of whatever is buffered, every complete request
in it answered (pread per READ, pwrite per WRITE, fdatasync per FLUSH), one sendmsg per batch.

    python3 bench/refloop.py IMAGE --port 10809 [--addr 127.0.0.1]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import threading

IHAVEOPT, OPT_REPLY_MAGIC = 0x49484156454F5054, 0x0003E889045565A9
REQUEST, SIMPLE_REPLY = 0x25609513, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
TX_FLAGS = 0x0001 | 0x0004  # HAS_FLAGS | SEND_FLUSH
EIO, EINVAL = 5, 22
REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, cookie


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed during the handshake")
        data += chunk
    return data


def handshake(sock: socket.socket, size: int) -> bool:
    """Fixed newstyle up to transmission; False if the client aborted."""
    sock.sendall(b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 0x0001 | 0x0002))  # FIXED, NO_ZEROES
    (client_flags,) = struct.unpack(">I", recv_exact(sock, 4))
    while True:
        _magic, opt, length = struct.unpack(">QII", recv_exact(sock, 16))
        recv_exact(sock, length)  # the export name and info requests: any name will do

        def reply(rtype: int, data: bytes = b"", opt: int = opt) -> None:
            sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

        if opt == OPT_EXPORT_NAME:
            zeroes = b"" if client_flags & 0x0002 else bytes(124)
            sock.sendall(struct.pack(">QH", size, TX_FLAGS) + zeroes)
            return True
        if opt in (OPT_INFO, OPT_GO):
            reply(REP_INFO, struct.pack(">HQH", 0, size, TX_FLAGS))  # NBD_INFO_EXPORT
            reply(REP_ACK)
            if opt == OPT_GO:
                return True
        elif opt == OPT_ABORT:
            reply(REP_ACK)
            return False
        else:  # STRUCTURED_REPLY, SET_META_CONTEXT, LIST, STARTTLS, ...
            reply(REP_ERR_UNSUP)


def send_all(sock: socket.socket, bufs: list[bytes]) -> None:
    while bufs:
        sent = sock.sendmsg(bufs[:512])  # below IOV_MAX
        while bufs and sent >= len(bufs[0]):
            sent -= len(bufs.pop(0))
        if sent:
            bufs[0] = bufs[0][sent:]


def serve(sock: socket.socket, fd: int, size: int) -> None:
    buf, chunk = bytearray(), bytearray(1 << 20)
    while True:
        n = sock.recv_into(chunk)  # whatever is buffered, up to 1 MiB
        if not n:
            return
        buf += memoryview(chunk)[:n]
        out: list[bytes] = []
        pos, done = 0, False
        while len(buf) - pos >= REQ.size and not done:
            magic, _flags, cmd, cookie, offset, length = REQ.unpack_from(buf, pos)
            end = pos + REQ.size + (length if cmd == CMD_WRITE else 0)
            if magic != REQUEST or end > len(buf):
                done = magic != REQUEST  # bad magic: hang up; else wait for the payload
                break
            error, data = 0, b""
            try:
                if cmd in (CMD_READ, CMD_WRITE) and offset + length > size:
                    error = EINVAL
                elif cmd == CMD_READ:
                    data = os.pread(fd, length, offset)
                elif cmd == CMD_WRITE:
                    os.pwrite(fd, buf[pos + REQ.size : end], offset)
                elif cmd == CMD_FLUSH:
                    os.fdatasync(fd)
                elif cmd == CMD_DISC:
                    done = True
                else:
                    error = EINVAL
            except OSError as e:
                error = e.errno or EIO
            if cmd != CMD_DISC:
                out.append(REPLY.pack(SIMPLE_REPLY, error, cookie))
                if data and not error:
                    out.append(data)
            pos = end
        del buf[:pos]
        send_all(sock, out)
        if done:
            return


def connection(sock: socket.socket, fd: int, size: int) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if handshake(sock, size):
                serve(sock, fd, size)
        except (ConnectionError, OSError):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("image")
    p.add_argument("--port", type=int, default=10809)
    p.add_argument("--addr", default="127.0.0.1")
    args = p.parse_args()
    fd = os.open(args.image, os.O_RDWR)
    size = os.fstat(fd).st_size
    with socket.create_server((args.addr, args.port), backlog=64) as listener:
        print(
            f"reference loop (not a product): {args.image} on {args.addr}:{args.port}", flush=True
        )
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=connection, args=(sock, fd, size), daemon=True).start()


if __name__ == "__main__":
    main()
