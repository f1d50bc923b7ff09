"""dispatch.guarded: what a request's failure costs (its own reply, never the connection)."""

from __future__ import annotations

import errno
import logging

import pytest

from xnbdd.dispatch import Buffers, guarded
from xnbdd.proto.consts import Cmd, Errno, TxFlag
from xnbdd.proto.messages import ExportInfo, Negotiated, Request
from xnbdd.proto.transmission import simple_reply

REQ = Request(7, Cmd.READ, 0, 4096, 512)
SIMPLE = Negotiated(ExportInfo("disk", 1 << 20, TxFlag.HAS_FLAGS), TxFlag.HAS_FLAGS)


async def test_the_reply_it_guards_passes_through() -> None:
    async def fine() -> Buffers:
        return [b"reply"]

    assert await guarded(REQ, SIMPLE, {}, fine()) == [b"reply"]


async def test_an_os_error_is_its_errno_and_a_bug_is_eio_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> Buffers:
        raise OSError(errno.ENOSPC, "full")

    async def bug() -> Buffers:
        raise KeyError("oops")

    assert await guarded(REQ, SIMPLE, {}, fails()) == [simple_reply(7, Errno.ENOSPC)]
    with caplog.at_level(logging.ERROR, logger="xnbdd"):
        assert await guarded(REQ, SIMPLE, {}, bug()) == [simple_reply(7, Errno.EIO)]
    assert any(r.exc_info and "internal error" in r.getMessage() for r in caplog.records)
