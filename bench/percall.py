#!/usr/bin/env python3
"""Instructions per request of xnbd-server's data path, counted by valgrind's callgrind.

Wall-clock and CPU-time figures move with whatever else the machine runs; instruction counts do
not. The server runs under ``valgrind --tool=callgrind``; a client of our own (raw sockets, as
libnbd negotiates them: structured replies) sends batches of ``--depth`` requests, each batch in
one send, and reads all of its replies before the next, so the server sees exactly ``--depth``
requests per read at every depth (a deterministic stand-in for fio's QD16 and QD1). Counters are
zeroed after a warm-up and dumped after ``--requests`` requests; the figure is the whole
process's instructions (every thread) divided by the requests.

    .venv/bin/python bench/percall.py                           # 4 KiB read and write, QD1 and 16
    .venv/bin/python bench/percall.py --mode cow --ops read --depths 16
    .venv/bin/python bench/percall.py --xnbd-cmd 'env PYTHONPATH=/tmp/before python3 -m xnbdd'

Needs valgrind (callgrind_control). About a minute per server start on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
EXPORT = "disk"

IHAVEOPT, OPT_REPLY_MAGIC = 0x49484156454F5054, 0x0003E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REQUEST_MAGIC = 0x25609513
REQUEST = struct.Struct("!IHHQQI")
CMD_READ, CMD_WRITE = 0, 1


def recv_exact(sock: socket.socket, n: int, view: memoryview | None = None) -> None:
    buf = view if view is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        count = sock.recv_into(buf[got:n])
        if not count:
            raise ConnectionError("server closed the connection")
        got += count


def handshake(sock: socket.socket) -> int:
    """Fixed newstyle with structured replies, then GO; returns the export size."""
    greeting = bytearray(18)
    recv_exact(sock, 18, memoryview(greeting))
    sock.sendall(struct.pack("!I", 3))

    def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        sock.sendall(struct.pack("!QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            head = bytearray(20)
            recv_exact(sock, 20, memoryview(head))
            _magic, _opt, rep, length = struct.unpack("!QIII", head)
            body = bytearray(length)
            recv_exact(sock, length, memoryview(body))
            replies.append((rep, bytes(body)))
            if rep == 1 or rep & 0x80000000:
                return replies

    assert option(OPT_STRUCTURED_REPLY)[-1][0] == 1
    name = EXPORT.encode()
    size = -1
    for rep, body in option(OPT_GO, struct.pack("!I", len(name)) + name + b"\0\0"):
        assert not rep & 0x80000000, hex(rep)
        if rep == 3 and struct.unpack_from("!H", body)[0] == 0:
            size = struct.unpack_from("!Q", body, 2)[0]
    return size


def run_batches(sock: socket.socket, op: str, depth: int, bs: int, count: int, size: int) -> None:
    """``count`` requests in batches of ``depth``, each batch sent whole, its replies read whole."""
    rng = random.Random(1)
    blocks = size // bs
    payload = os.urandom(bs)
    reply = 16 if op == "write" else 20 + 8 + bs  # simple reply; one OFFSET_DATA chunk
    sink = memoryview(bytearray(reply * depth))
    cmd = CMD_WRITE if op == "write" else CMD_READ
    for first in range(0, count, depth):
        parts = []
        for cookie in range(first, min(first + depth, count)):
            offset = rng.randrange(blocks) * bs
            parts.append(REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, bs))
            if cmd == CMD_WRITE:
                parts.append(payload)
        sock.sendall(b"".join(parts))
        n = min(depth, count - first)
        recv_exact(sock, reply * n, sink)
        if op == "write":
            assert struct.unpack_from("!I", sink, 4)[0] == 0, "write failed"


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def totals(path: Path) -> int:
    text = path.read_text()
    found = re.findall(r"^(?:totals|summary): (\d+)", text, re.M)
    if not found:
        raise RuntimeError(f"no totals in {path}")
    return int(found[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--xnbd-cmd", default=f"{sys.executable} -m xnbdd")
    p.add_argument("--mode", choices=("target", "cow"), default="target")
    p.add_argument("--ops", default="read,write")
    p.add_argument("--depths", default="1,16")
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=800)
    p.add_argument("--size", type=int, default=64, help="image MiB (on /dev/shm)")
    p.add_argument("--port", type=int, default=10877)
    p.add_argument("--keep", type=Path, help="copy the callgrind dumps here (callgrind_annotate)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="percall.", dir="/dev/shm"))
    image = work / "disk.img"
    with image.open("wb") as writer:
        for _ in range(args.size):
            writer.write(os.urandom(MiB))
    out = work / "callgrind.out"
    cmd = shlex.split(args.xnbd_cmd)
    mode = ["--target", str(image)]
    if args.mode == "cow":
        mode = ["--cow-target", str(image), "--cow-dir", str(work)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--dump-line=no",
            "--trace-children=yes",  # through env(1) and the like
            *cmd,
            *mode,
            "--lport",
            str(args.port),
            "--laddr",
            "127.0.0.1",
        ],
        env=env,
        cwd=work,  # not the caller's directory: ``-m xnbdd`` would import the tree found there
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", args.port))
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.5)
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            size = handshake(sock)
            for op in args.ops.split(","):
                for depth in map(int, args.depths.split(",")):
                    run_batches(sock, op, depth, args.bs, args.warmup, size)
                    control(server.pid, "-z")
                    run_batches(sock, op, depth, args.bs, args.requests, size)
                    dump = work / f"{op}-{depth}"
                    before = set(work.glob("callgrind.out*"))
                    control(server.pid, "-d", dump.name)
                    files = sorted(set(work.glob("callgrind.out*")) - before)
                    total = sum(totals(f) for f in files)
                    print(
                        f"{args.mode} {op} bs={args.bs} depth={depth}: "
                        f"{total / args.requests:,.0f} instructions/request",
                        flush=True,
                    )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for leftover in work.iterdir():
            if args.keep and leftover.name.startswith("callgrind.out") and leftover != out:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.move(leftover, args.keep / leftover.name)
            else:
                leftover.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
