"""Request validation, by Hypothesis over every command x flag combination. (Framing is the
data plane's: tests/test_dataplane.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnbdd.proto.consts import Cmd, CmdFlag, Errno, TxFlag
from xnbdd.proto.errors import RequestError
from xnbdd.proto.messages import Request
from xnbdd.proto.transmission import check_request

ALL_TX = TxFlag(sum(TxFlag))
SIZE = 1 << 20


ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
    Cmd.DISC: CmdFlag.FUA,
}


@settings(max_examples=1000)
@given(
    cmd=st.integers(0, 12),
    flags=st.integers(0, 0xFFFF),
    offset=st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
    readonly=st.booleans(),
    structured=st.booleans(),
)
def test_validation_follows_the_spec(
    cmd: int, flags: int, offset: int, length: int, readonly: bool, structured: bool
) -> None:
    tx = ALL_TX & ~TxFlag.READ_ONLY
    if readonly:
        tx |= TxFlag.READ_ONLY
    req = Request(1, cmd, flags, offset, length)
    errno: Errno | None
    try:
        check_request(req, size=SIZE, tx_flags=tx, structured=structured, has_contexts=True)
    except RequestError as err:
        errno = err.errno
    else:
        errno = None
    if cmd not in ALLOWED:
        assert errno is Errno.EINVAL
        return
    command = Cmd(cmd)
    allowed = int(ALLOWED[command])
    if not structured:
        allowed &= ~int(CmdFlag.DF)
    if flags & ~allowed:
        assert errno is Errno.EINVAL
    elif readonly and command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert errno is Errno.EPERM
    elif command is Cmd.FLUSH:
        assert errno is (Errno.EINVAL if offset or length else None)
    elif command is Cmd.DISC:
        assert errno is None
    elif command in (Cmd.READ, Cmd.WRITE) and length > 32 * 1024 * 1024:
        assert errno is Errno.EINVAL
    elif offset + length > SIZE:
        want = Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        assert errno is want
    elif command is Cmd.BLOCK_STATUS and length == 0:
        assert errno is Errno.EINVAL
    else:
        assert errno is None


def test_commands_not_advertised_are_refused() -> None:
    for cmd, flag in [
        (Cmd.TRIM, TxFlag.SEND_TRIM),
        (Cmd.CACHE, TxFlag.SEND_CACHE),
        (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES),
        (Cmd.FLUSH, TxFlag.SEND_FLUSH),
    ]:
        with pytest.raises(RequestError) as info:
            check_request(
                Request(1, cmd, 0, 0, 0),
                size=SIZE,
                tx_flags=ALL_TX & ~flag,
                structured=False,
                has_contexts=False,
            )
        assert info.value.errno is Errno.EINVAL


def test_block_status_needs_a_selected_context() -> None:
    with pytest.raises(RequestError):
        check_request(
            Request(1, Cmd.BLOCK_STATUS, 0, 0, 512),
            size=SIZE,
            tx_flags=ALL_TX,
            structured=True,
            has_contexts=False,
        )


def test_proto_package_never_imports_trio() -> None:
    code = (
        "import importlib, pkgutil, sys, xnbdd.proto as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('xnbdd.proto.' + m.name)\n"
        "assert len(list(pkgutil.iter_modules(p.__path__))) >= 5\n"
        "sys.exit('trio' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
