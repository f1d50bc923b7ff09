"""Bitmap: the exact xNBD file layout, range operations against a reference model, persistence."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.backends.bitmap import BLOCK_SIZE, Bitmap, bitmap_file_size, nblocks_for


def test_sizes_match_the_compat_examples() -> None:
    assert BLOCK_SIZE == 4096
    assert nblocks_for(0) == 0
    assert nblocks_for(1) == 1
    assert nblocks_for(4096) == 1
    assert nblocks_for(4097) == 2
    assert nblocks_for(10_000) == 3
    assert bitmap_file_size(nblocks_for(10_000)) == 8
    assert bitmap_file_size(nblocks_for(64 << 20)) == 2048
    assert bitmap_file_size(nblocks_for(1 << 30)) == 32768
    assert bitmap_file_size(0) == 0
    assert bitmap_file_size(64) == 8
    assert bitmap_file_size(65) == 16


def test_every_bit_lands_where_xnbd_puts_it(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    nblocks = 200
    for block in range(nblocks):
        bitmap = Bitmap.open(str(path), nblocks, clear=True)
        bitmap.set_range(block, block + 1)
        bitmap.close()
        raw = path.read_bytes()
        assert len(raw) == 32
        # x86-64 view: little-endian 64-bit words, bit i % 64 of word i // 64
        words = struct.unpack("<4Q", raw)
        assert words[block // 64] == 1 << (block % 64)
        assert sum(w.bit_count() for w in words) == 1
        # byte view: byte i // 8, mask 1 << (i % 8)
        assert raw[block // 8] == 1 << (block % 8)


def test_file_is_created_0600_and_zeroed(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    bitmap = Bitmap.open(str(path), 100)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == bytes(16)
    assert bitmap.count() == 0
    bitmap.close()


def test_existing_bitmap_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    path.write_bytes(struct.pack("<2Q", 0b1011, 1 << 63))
    bitmap = Bitmap.open(str(path), 128)
    assert [b for b in range(128) if bitmap.test(b)] == [0, 1, 3, 127]
    assert bitmap.count() == 4
    bitmap.close()


def test_bits_past_nblocks_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    path.write_bytes(b"\xff" * 8)  # a writer that did not keep the tail clear
    bitmap = Bitmap.open(str(path), 3)
    assert bitmap.count() == 3
    assert list(bitmap.runs(0, 3, False)) == []
    bitmap.close()


def test_wrong_size_is_refused_with_both_sizes(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    path.write_bytes(bytes(24))
    with pytest.raises(ValueError) as info:
        Bitmap.open(str(path), 128)
    message = str(info.value)
    assert str(path) in message and "24" in message and "16" in message
    assert path.read_bytes() == bytes(24)  # untouched


def test_clear_resizes_and_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    path.write_bytes(b"\xff" * 24)
    bitmap = Bitmap.open(str(path), 128, clear=True)
    assert bitmap.count() == 0
    bitmap.close()
    assert path.read_bytes() == bytes(16)


def test_readonly_refuses_changes_and_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    path.write_bytes(b"\x01" + bytes(7))
    bitmap = Bitmap.open(str(path), 64, readonly=True)
    assert bitmap.test(0)
    with pytest.raises(OSError):
        bitmap.set_range(1, 2)
    bitmap.close()
    with pytest.raises(ValueError):
        Bitmap.open(str(path), 65, readonly=True)
    with pytest.raises(FileNotFoundError):
        Bitmap.open(str(tmp_path / "missing"), 64, readonly=True)


def test_changes_reach_the_file_only_at_sync(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    bitmap = Bitmap.open(str(path), 1000)
    bitmap.set_range(10, 700)
    assert path.read_bytes() == bytes(128)  # not yet persisted
    bitmap.sync()
    reopened = Bitmap.open(str(path), 1000, readonly=True)
    assert list(reopened.runs(0, 1000, True)) == [(10, 700)]
    reopened.close()
    bitmap.close()


def test_capture_defines_what_is_persisted(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    bitmap = Bitmap.open(str(path), 64)
    bitmap.set_range(0, 1)
    pending = bitmap.capture()
    bitmap.set_range(1, 2)  # set after the capture: not part of this write-back
    bitmap.write_back(pending)
    assert path.read_bytes()[0] == 0b01
    bitmap.sync()
    assert path.read_bytes()[0] == 0b11
    bitmap.close()


def test_failed_write_back_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "bm"
    bitmap = Bitmap.open(str(path), 64)
    bitmap.set_range(5, 6)
    pending = bitmap.capture()
    real_fd = bitmap._fd
    bitmap._fd = os.open(os.devnull, os.O_RDONLY)  # writes fail with EBADF
    with pytest.raises(OSError):
        bitmap.write_back(pending)
    os.close(bitmap._fd)
    bitmap._fd = real_fd
    bitmap.sync()
    assert path.read_bytes()[0] == 1 << 5
    bitmap.close()


def test_zero_blocks() -> None:
    bitmap = Bitmap.in_memory(0)
    assert bitmap.count() == 0
    assert bitmap.all_set(0, 0)
    assert list(bitmap.runs(0, 0, True)) == []
    bitmap.set_range(0, 0)


def test_range_checks() -> None:
    bitmap = Bitmap.in_memory(10)
    with pytest.raises(IndexError):
        bitmap.set_range(5, 11)
    with pytest.raises(IndexError):
        bitmap.test(10)
    with pytest.raises(IndexError):
        list(bitmap.runs(-1, 3, True))


def _model_runs(bits: list[bool], start: int, stop: int, value: bool) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    a = start
    while a < stop:
        if bits[a] != value:
            a += 1
            continue
        b = a
        while b < stop and bits[b] == value:
            b += 1
        runs.append((a, b))
        a = b
    return runs


operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 300)), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(
    nblocks=st.integers(1, 300),
    ops=operations,
    window=st.tuples(st.integers(0, 300), st.integers(0, 300)),
)
def test_matches_a_list_of_booleans(
    nblocks: int, ops: list[tuple[bool, int, int]], window: tuple[int, int]
) -> None:
    bitmap = Bitmap.in_memory(nblocks)
    model = [False] * nblocks
    for value, a, b in ops:
        start, stop = sorted((a % (nblocks + 1), b % (nblocks + 1)))
        if value:
            bitmap.set_range(start, stop)
        else:
            bitmap.clear_range(start, stop)
        model[start:stop] = [value] * (stop - start)
    assert bitmap.count() == sum(model)
    assert [bitmap.test(i) for i in range(nblocks)] == model
    start, stop = sorted((window[0] % (nblocks + 1), window[1] % (nblocks + 1)))
    for value in (True, False):
        assert list(bitmap.runs(start, stop, value)) == _model_runs(model, start, stop, value)
    assert bitmap.all_set(start, stop) == all(model[start:stop])
    # the serialized form is the LSB-first byte array, tail bits zero
    expected = bytearray(len(bitmap.to_bytes()))
    for i, bit in enumerate(model):
        if bit:
            expected[i // 8] |= 1 << (i % 8)
    assert bitmap.to_bytes() == bytes(expected)


def test_large_bitmap_is_fast() -> None:
    nblocks = nblocks_for(1 << 40)  # 1 TiB export, 32 MiB of bits
    bitmap = Bitmap.in_memory(nblocks)
    bitmap.set_range(3, nblocks - 5)
    assert bitmap.count() == nblocks - 8
    assert list(bitmap.runs(0, nblocks, False)) == [(0, 3), (nblocks - 5, nblocks)]
    assert not bitmap.all_set(0, nblocks)
    assert bitmap.all_set(3, nblocks - 5)
