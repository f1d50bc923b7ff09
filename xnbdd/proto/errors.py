"""Errors of the sans-IO core, each carrying what goes on the wire.

Two families, as in h11: ``ProtocolError`` means the peer broke a MUST or framing is lost, so the
only answer is closing the connection; ``OptionError`` and ``RequestError`` are answered with an
error reply (``Rep.ERR_*`` or an NBD errno) and the connection stays usable.
"""

from __future__ import annotations

from .consts import Errno, Rep


class NBDError(Exception):
    """Base of every error raised by ``xnbdd.proto``."""


class ProtocolError(NBDError):
    """The peer broke the protocol; the connection must be closed without another word."""


class OptionError(NBDError):
    """An option is refused with an ``NBD_REP_ERR_*`` reply; negotiation continues."""

    def __init__(self, rep: Rep, message: str = "") -> None:
        super().__init__(message or rep.name)
        self.rep = rep
        self.message = message


class RequestError(NBDError):
    """A request is refused with an NBD errno; transmission continues."""

    def __init__(self, errno: Errno, message: str = "") -> None:
        super().__init__(message or errno.name)
        self.errno = errno
        self.message = message
