"""NBD extended headers (docs/data-path.md) with today's clients: Debian 13's libnbd 1.22 and
qemu 10 (tests/e2e/trixie.py) against the server on the host, nbdkit 1.42 as the proxy's
origin; Debian 12's libnbd 1.14 and qemu 7.2 on the host still served with compact headers.

What each test checks is seen from outside: the clients' own debug and trace output, the bytes
and the allocation of the image file on the host, the proxy's log."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.test_proxy_e2e import ProxyFiles
from tests.e2e.trixie import nspawn_command, run_in_tree
from tests.libnbd import import_nbd
from tests.origin_servers import free_port, need, wait_listening
from tests.serverproc import running_server, stop_process
from tests.wrapper.wrapperproc import running_wrapper

pytestmark = [pytest.mark.e2e, pytest.mark.nspawn]

GiB = 1 << 30
MiB = 1 << 20
HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def data_runs(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the file's data (SEEK_DATA/SEEK_HOLE), the rest being holes."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, stop - start))
            pos = stop
    finally:
        os.close(fd)
    return runs


def nonzero_bytes(path: Path) -> dict[int, bytes]:
    """Every data run of the file with zeros stripped from its ends: what it holds, exactly."""
    out = {}
    with open(path, "rb") as f:
        for start, length in data_runs(path):
            f.seek(start)
            data = f.read(length)
            stripped = data.lstrip(b"\0")
            if stripped:
                out[start + len(data) - len(stripped)] = stripped.rstrip(b"\0")
    return out


NBDSH_SCRIPT = r"""
import json, sys, nbd
G = 1 << 30
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
out = {"extended": h.get_extended_headers_negotiated(),
       "payload": h.can_block_status_payload()}
for offset, byte in ((0, b"A"), (3 * G, b"B"), (9 * G, b"C"), (15 * G, b"D")):
    h.pwrite(byte * 65536, offset)
# libnbd never splits a command: each of these is one request longer than 32 bits allows
h.zero(6 * G, 2 * G)           # [2G, 8G), over B
h.trim(5 * G, 9 * G)           # [9G, 14G), over C
h.cache(12 * G, 1 * G)
h.flush()
def collect(into):
    def cb(meta, offset, entries, err):
        into.append([meta, offset, [list(e) for e in entries]])
        return 0
    return cb
out["status"] = []
h.block_status_64(16 * G, 0, collect(out["status"]))
out["filtered"] = []
h.block_status_filter(16 * G, 0, ["base:allocation"], collect(out["filtered"]))
out["reads"] = {str(o): h.pread(4, o).hex() for o in (0, 3 * G, 9 * G, 15 * G)}
h.shutdown()
print(json.dumps(out))
"""


def test_libnbd_1_22_negotiates_extended_headers(trixie_tree: Path, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        result = run_in_tree(trixie_tree, ["nbdinfo", server.uri], env={"LIBNBD_DEBUG": "1"})
    output = result.stdout + result.stderr  # nspawn may hand both streams over as one
    assert "negotiated extended headers" in output, output[-3000:]
    assert "using extended packets" in output, output[-3000:]


def test_nbdsh_zero_trim_cache_and_block_status_beyond_32_bits(
    trixie_tree: Path, tmp_path: Path
) -> None:
    """On a 16 GiB sparse image: WRITE_ZEROES, TRIM and CACHE of 6, 9 and 12 GiB in one
    request each, BLOCK_STATUS of the whole image answered with 64-bit extents equal to the
    image's allocation on the host, the payload form filtering to one context; then the bytes
    of the image are exactly what was written and not zeroed or trimmed."""
    size = 16 * GiB
    image = sparse_image(tmp_path / "disk.img", size)
    script = tmp_path / "script.py"
    script.write_text(NBDSH_SCRIPT)
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        result = run_in_tree(trixie_tree, ["python3", str(script), server.uri], binds=[script])
    out = json.loads(result.stdout)
    assert out["extended"] and out["payload"]
    assert out["reads"] == {
        str(0): "41414141",
        str(3 * GiB): "00000000",
        str(9 * GiB): "00000000",  # we punch trimmed ranges: they read as zeros
        str(15 * GiB): "44444444",
    }
    assert nonzero_bytes(image) == {0: b"A" * 65536, 15 * GiB: b"D" * 65536}

    # block status: one chunk for the one context, covering the image, as the host sees it
    [(meta, offset, extents)] = out["status"]
    assert (meta, offset) == ("base:allocation", 0)
    assert sum(length for length, _flags in extents) == size
    expected, pos = [], 0
    for start, length in data_runs(image):
        if start > pos:
            expected.append([start - pos, HOLE_ZERO])
        expected.append([length, 0])
        pos = start + length
    if pos < size:
        expected.append([size - pos, HOLE_ZERO])
    assert extents == expected
    assert any(length > 4 * GiB for length, _flags in extents), extents
    assert out["filtered"] == out["status"]


def test_nbdcopy_round_trip_with_extended_headers(trixie_tree: Path, tmp_path: Path) -> None:
    size = 48 * MiB
    source = tmp_path / "source.img"
    rng = random.Random(13)
    with open(source, "wb") as f:  # data, holes and zeros, to exercise zero and block status
        f.truncate(size)
        for offset in range(0, size, 4 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB) if offset % (8 * MiB) else bytes(MiB))
    image = sparse_image(tmp_path / "disk.img", size)
    back = tmp_path / "back.img"
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        pushed = run_in_tree(
            trixie_tree,
            ["nbdcopy", "--verbose", str(source), server.uri],  # verbose: libnbd's debug too
            binds=[source],
        )
        run_in_tree(trixie_tree, ["nbdcopy", server.uri, str(back)], writable=[tmp_path])
    assert "negotiated extended headers" in pushed.stdout + pushed.stderr
    assert image.read_bytes() == source.read_bytes()
    assert back.read_bytes() == source.read_bytes()


def test_qemu_10_uses_extended_headers(trixie_tree: Path, tmp_path: Path) -> None:
    """qemu-io's trace shows the option acknowledged and a 5 GiB WRITE_ZEROES sent as one
    request; qemu-img map's trace shows 64-bit status chunks, and its map the allocation."""
    image = sparse_image(tmp_path / "disk.img", 8 * GiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        io = run_in_tree(
            trixie_tree,
            [
                "qemu-io",
                "--trace",
                "nbd_*",
                "-f",
                "raw",
                "-c",
                "write -P 0x55 0 64k",
                "-c",
                "write -P 0x66 3G 64k",
                "-c",
                "write -z -u -n 1G 5G",  # -n lifts qemu-io's 2 GiB limit (no slow fallback)
                "-c",
                "read -P 0x55 0 64k",
                "-c",
                "read -P 0 3G 64k",
                server.uri,
            ],
        )
        mapped = run_in_tree(
            trixie_tree,
            ["qemu-img", "--trace", "nbd_*", "map", "--output=json", "-f", "raw", server.uri],
        )
    trace = io.stdout + io.stderr
    assert "Received option reply 11 (extended headers), type 1 (ack)" in trace, trace[-3000:]
    assert ".len = 5368709120" in trace and "(write zeroes)" in trace
    assert "Pattern verification failed" not in trace
    assert "block status (64-bit)" in mapped.stdout + mapped.stderr
    lines = mapped.stdout.splitlines()  # the trace may come on the same stream: keep the map
    regions = [json.loads(line.rstrip(",").strip("[]")) for line in lines if line[:1] in "[{"]
    assert [(r["start"], r["length"], r["data"]) for r in regions] == [
        (0, 64 * 1024, True),
        (64 * 1024, 8 * GiB - 64 * 1024, False),
    ]
    assert nonzero_bytes(image) == {0: b"\x55" * 65536}


def test_debian_12_clients_keep_compact_headers(tmp_path: Path) -> None:
    """libnbd 1.14 and qemu 7.2 (the host's) do not know extended headers: they get structured
    replies with compact headers, as before."""
    nbdinfo, qemu_io = need("nbdinfo"), need("qemu-io")
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    with running_server("--target", str(image), tmp_path=tmp_path) as server:
        info = subprocess.run(
            [nbdinfo, server.uri],
            capture_output=True,
            text=True,
            env={**os.environ, "LIBNBD_DEBUG": "1"},
            check=True,
        )
        io = subprocess.run(
            [
                *(qemu_io, "-f", "raw", "--trace", "nbd_*"),
                *("-c", "write -P 0x33 1M 64k", "-c", "write -z 2M 1M"),
                *("-c", "read -P 0x33 1M 64k", server.uri),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    assert "using structured packets" in info.stdout, info.stdout
    assert "extended" not in info.stdout
    trace = io.stdout + io.stderr
    assert "extended headers" not in trace and "Pattern verification failed" not in trace
    assert "(structured reply), type 1 (ack)" in trace, trace[-3000:]
    assert nonzero_bytes(image) == {MiB: b"\x33" * 65536}


# -- the proxy's origin client ----------------------------------------------------------------


@contextmanager
def trixie_origin(tree: Path, argv: list[str], image: Path) -> Iterator[int]:
    """A server of Debian 13 serving ``image`` read-only on 127.0.0.1 (the host's loopback);
    ``argv`` gets the port appended for its ``{port}``. Yields the port."""
    port = free_port()
    argv = [arg.format(port=port, image=image) for arg in argv]
    log = image.with_suffix(".origin.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            nspawn_command(tree, argv, binds=[image]), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_listening("127.0.0.1", port, proc)
        yield port
    finally:
        stop_process(proc, 15)


ORIGINS = {
    # qemu 10 implements the extension as a server
    "qemu-nbd 10": (
        ["qemu-nbd", "-f", "raw", "-r", "-t", "-b", "127.0.0.1", "-p", "{port}", "{image}"],
        "extended",
    ),
    # nbdkit 1.42 does not (its nbdkit-protocol(1): "Extended Headers Extension: Not
    # supported."): it refuses the option and the proxy goes on with compact headers
    "nbdkit 1.42": (
        ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", "{port}", "file", "{image}"],
        "compact",
    ),
}


def read_through_proxy(uri: str, size: int) -> bytes:
    nbd = import_nbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(bytes(h.pread(min(4 * MiB, size - o), o)) for o in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


@pytest.mark.parametrize("origin", [*ORIGINS, "xnbd-server"])
def test_proxy_uses_extended_headers_when_its_origin_offers_them(
    trixie_tree: Path, tmp_path: Path, origin: str
) -> None:
    """The proxy's link asks for extended headers and reads through them where the origin
    takes them (qemu 10, our own server), compact ones elsewhere; the data is the origin's."""
    size = 16 * MiB
    source = tmp_path / "origin.img"
    source.write_bytes(random.Random(7).randbytes(size))
    files = ProxyFiles.under(tmp_path)
    with contextlib.ExitStack() as stack:
        if origin == "xnbd-server":
            port = stack.enter_context(
                running_server("--target", "--readonly", str(source), tmp_path=tmp_path)
            ).port
            headers = "extended"
        else:
            argv, headers = ORIGINS[origin]
            port = stack.enter_context(trixie_origin(trixie_tree, argv, source))
        with running_server(*files.args("127.0.0.1", str(port)), tmp_path=tmp_path) as proxy:
            assert read_through_proxy(proxy.uri, size) == source.read_bytes()
    assert f"({size} bytes, {headers} headers)" in proxy.log(), proxy.log()


def test_wrapper_hands_extended_headers_to_the_export_server(
    trixie_tree: Path, tmp_path: Path
) -> None:
    """Through xnbd-wrapper the front end negotiates extended headers and the export's server,
    which gets the connection by hand-off, goes on with 32-byte requests and replies."""
    disk = sparse_image(tmp_path / "disk.img", 16 * MiB)
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(17).randbytes(16 * MiB))
    with running_wrapper(tmp_path, "--imgfile", str(disk)) as w:
        pushed = run_in_tree(
            trixie_tree, ["nbdcopy", "--verbose", str(source), w.uri(str(disk))], binds=[source]
        )
        assert len(w.export_servers()) == 1
    assert "negotiated extended headers" in pushed.stdout + pushed.stderr
    assert disk.read_bytes() == source.read_bytes()
