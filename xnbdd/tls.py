"""TLS for NBD's STARTTLS: contexts built from a certificate directory, and one TLS session that
the event loop starts and the data-plane thread continues.

A session is an ``ssl.SSLObject`` over two ``ssl.MemoryBIO``: the object owns no socket, so the
event loop can run the TLS handshake and the rest of option haggling through it (``TLSChannel``),
and the data-plane thread then goes on with the same session on the raw file descriptor
(``TLSTransport``) — a ``trio.SSLStream`` keeps its state to itself and cannot be handed over.
Python's ``ssl`` has no kernel TLS, so a TLS connection encrypts in user space and has no
``sendfile``; the plain path (``PlainTransport``) is what it was: readv, writev and sendfile on
the fd (docs/tls.md).

Certificate directory layout (as qemu and nbdkit use): ``ca-cert.pem`` (the CA that signs peers'
certificates: clients' with ``--tls-verify-peer``), ``server-cert.pem`` and ``server-key.pem``.
For the proxy's link to its origin: a CA file to verify the origin and an optional client
certificate and key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from .proto.handshake import TLSPolicy

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
RAW_READ = 256 * 1024  # ciphertext read from the socket at once
ENCRYPT_STEP = 256 * 1024  # plaintext encrypted per send: bounds the ciphertext held back


class TLSConfigError(ValueError):
    """TLS cannot be set up as asked; the message is one line for the administrator."""


@dataclass(frozen=True)
class ServerTLSOptions:
    mode: TLSPolicy = TLSPolicy.OFF
    certificates: str = ""  # directory with ca-cert.pem, server-cert.pem, server-key.pem
    verify_peer: bool = False  # clients must present a certificate signed by ca-cert.pem
    psk_file: str = ""  # psktool format: identity:hexkey per line


@dataclass(frozen=True)
class ClientTLSOptions:
    """The proxy's origin link. ``ca`` empty: the system's trusted CAs."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_hostname: str | None = None  # checked against the origin's certificate


def psk_supported() -> bool:
    # The stdlib gained PSK callbacks in Python 3.13: this is a version boundary of the standard
    # library, not a probe of one of our own objects.
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def read_psk_file(path: str) -> dict[str, bytes]:
    """psktool's format: ``identity:hexkey`` per line."""
    keys: dict[str, bytes] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TLSConfigError(f"--tls-psk {path}: cannot read: {err}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        identity, sep, key = line.strip().partition(":")
        try:
            if not sep or not identity or not key:
                raise ValueError
            keys[identity] = bytes.fromhex(key)
        except ValueError:
            raise TLSConfigError(
                f"--tls-psk {path}:{number}: expected 'identity:hexkey' (psktool format)"
            ) from None
    if not keys:
        raise TLSConfigError(f"--tls-psk {path}: no keys")
    return keys


@dataclass(frozen=True)
class ServerTLS:
    """What a connection needs: the policy, and the context when TLS is not off."""

    policy: TLSPolicy = TLSPolicy.OFF
    context: ssl.SSLContext | None = None


def server_tls(opts: ServerTLSOptions) -> ServerTLS:
    if opts.mode is TLSPolicy.OFF:
        if opts.certificates or opts.psk_file or opts.verify_peer:
            raise TLSConfigError("TLS settings are given but --tls is off")
        return ServerTLS()
    return ServerTLS(opts.mode, server_context(opts))


def server_context(opts: ServerTLSOptions) -> ssl.SSLContext:
    """The server's context; TLSConfigError names what is missing or unreadable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    if opts.psk_file:
        if opts.certificates or opts.verify_peer:
            raise TLSConfigError("--tls-psk excludes --tls-certificates and --tls-verify-peer")
        if not psk_supported():
            raise TLSConfigError(
                "--tls-psk: this Python's ssl module has no pre-shared key support "
                "(Python 3.13 or newer is needed); use --tls-certificates"
            )
        keys = read_psk_file(opts.psk_file)
        # OpenSSL's PSK callbacks serve TLS 1.2 PSK cipher suites only.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("PSK")
        ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))  # type: ignore[attr-defined,unused-ignore]
        return ctx
    if not opts.certificates:
        raise TLSConfigError("TLS needs --tls-certificates DIR (or --tls-psk FILE)")
    where = Path(opts.certificates)
    try:
        ctx.load_cert_chain(where / SERVER_CERT, where / SERVER_KEY)
    except (OSError, ssl.SSLError) as err:
        raise TLSConfigError(
            f"--tls-certificates {where}: cannot load {SERVER_CERT} and {SERVER_KEY}: {err}"
        ) from None
    if opts.verify_peer:
        try:
            ctx.load_verify_locations(cafile=where / CA_CERT)
        except (OSError, ssl.SSLError) as err:
            raise TLSConfigError(
                f"--tls-verify-peer: cannot load {where / CA_CERT}: {err}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(opts: ClientTLSOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=opts.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if opts.server_hostname is None:
        ctx.check_hostname = False  # the CA still has to sign the origin's certificate
    if opts.cert or opts.key:
        if not (opts.cert and opts.key):
            raise TLSConfigError("--remote-tls-cert and --remote-tls-key go together")
        try:
            ctx.load_cert_chain(opts.cert, opts.key)
        except (OSError, ssl.SSLError) as err:
            raise TLSConfigError(f"--remote-tls-cert {opts.cert}: cannot load: {err}") from None
    return ctx


class TLSSession:
    """One connection's TLS state, without I/O of its own: ciphertext goes in with ``feed``
    and comes out of ``outgoing``."""

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool = True) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)

    def feed(self, ciphertext: bytes) -> None:
        if ciphertext:
            self.incoming.write(ciphertext)
        else:
            self.incoming.write_eof()

    def describe(self) -> str:
        version = self.obj.version() or "TLS"
        cipher = self.obj.cipher()
        return f"{version} {cipher[0]}" if cipher else version


class TLSChannel:
    """The session on the event loop: the TLS handshake, then option haggling through it, with
    the ``send_all``/``receive_some`` of a trio stream."""

    def __init__(self, stream: trio.SocketStream, session: TLSSession) -> None:
        self.stream = stream
        self.session = session

    async def _flush(self) -> None:
        data = self.session.outgoing.read()
        if data:
            await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RAW_READ)
        self.session.feed(data)

    async def handshake(self) -> None:
        """Run the TLS handshake; ssl.SSLError when it fails (bad certificate, not TLS...)."""
        while True:
            try:
                self.session.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def send_all(self, data: bytes) -> None:
        self.session.obj.write(data)
        await self._flush()

    async def receive_some(self, max_bytes: int) -> bytes:
        """Plaintext; b"" at the end of the stream (close_notify or a closed socket)."""
        while True:
            try:
                return self.session.obj.read(max_bytes)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a post-handshake message the peer waits for
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


class Transport(Protocol):
    """How the data plane moves bytes on its connection; every call is non-blocking and raises
    BlockingIOError like the os call it stands for. ``sendfile`` and ``splice`` are used only
    where ``zero_copy`` is true."""

    fd: int
    zero_copy: bool

    def readv(self, views: list[memoryview], /) -> int: ...

    def writev(self, parts: list[bytes | bytearray | memoryview], /) -> int: ...

    def sendfile(self, in_fd: int, offset: int, count: int, /) -> int: ...

    def splice(self, pipe_fd: int, count: int, /) -> int:
        """Move up to ``count`` received bytes into a pipe (only where ``zero_copy``)."""
        ...

    def has_output(self) -> bool:
        """Bytes accepted but not yet on the socket (the plane waits for POLLOUT for them)."""
        ...

    def flush(self) -> bool:
        """Push those bytes out; True when none remain. OSError when the peer is gone."""
        ...

    def close_notify(self) -> None:
        """Say the end of the stream at this layer (before the socket's SHUT_WR)."""
        ...


class PlainTransport:
    """The socket itself: the os calls, bound to the fd, are the transport (no layer between)."""

    zero_copy = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.readv = partial(os.readv, fd)
        self.writev = partial(os.writev, fd)
        self.sendfile = partial(os.sendfile, fd)

    def splice(self, pipe_fd: int, count: int) -> int:
        return os.splice(self.fd, pipe_fd, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)

    def has_output(self) -> bool:
        return False

    def flush(self) -> bool:
        return True

    def close_notify(self) -> None:
        pass


class TLSTransport:
    """The session on the data-plane thread, over the non-blocking fd. Plaintext handed to
    ``writev`` is encrypted at once and counts as sent; its ciphertext may wait here (at most
    about ``ENCRYPT_STEP``) until the socket takes it, and no new plaintext is taken meanwhile,
    so the plane's flow control still sees a full socket."""

    zero_copy = False

    def __init__(self, fd: int, session: TLSSession) -> None:
        self.fd = fd
        self.session = session
        self._obj = session.obj
        self._incoming = session.incoming
        self._outgoing = session.outgoing
        self._pending = memoryview(b"")  # ciphertext the socket has not taken yet
        self._eof = False

    def has_output(self) -> bool:
        return bool(self._pending) or self._outgoing.pending > 0

    def flush(self) -> bool:
        if not self._pending and self._outgoing.pending:
            self._pending = memoryview(self._outgoing.read())
        while self._pending:
            try:
                sent = os.write(self.fd, self._pending)
            except BlockingIOError:
                return False
            self._pending = self._pending[sent:]
            if not self._pending and self._outgoing.pending:
                self._pending = memoryview(self._outgoing.read())
        return True

    def readv(self, views: list[memoryview]) -> int:
        """Decrypt into ``views[0]`` as much as is there: a short count means the socket and
        the session are both empty, as a short read on a plain socket does."""
        view = views[0]
        got = 0
        while got < len(view):
            # Nothing buffered at all: go to the socket without an SSLWantReadError first.
            empty = not self._incoming.pending and not self._obj.pending()
            if empty and not self._eof and not self._fill():
                break
            try:
                count = int(self._obj.read(len(view) - got, view[got:]))
            except ssl.SSLWantReadError:  # a record is incomplete
                if self._eof or not self._fill():
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                break
            except ssl.SSLError as err:
                raise OSError(f"TLS: {err}") from None
            if not count:
                self._eof = True
                break
            got += count
        if self._outgoing.pending:
            with contextlib.suppress(BlockingIOError):
                self.flush()  # the peer may wait for an answer (e.g. a TLS 1.3 key update)
        if got:
            return got
        if self._eof:
            return 0
        raise BlockingIOError

    def _fill(self) -> bool:
        """Ciphertext from the socket into the session; False when the socket has none now."""
        try:
            data = os.read(self.fd, RAW_READ)
        except BlockingIOError:
            return False
        if data:
            self._incoming.write(data)
        else:
            self._eof = True
            self._incoming.write_eof()
        return True

    def writev(self, parts: list[bytes | bytearray | memoryview]) -> int:
        """Encrypt and send while the socket takes it all; a short count (or BlockingIOError
        for none) means the socket is full, as with writev. Small parts (a reply's header and
        its data) are joined first: one TLS record for many replies, not two per reply."""
        taken = 0
        index, offset = 0, 0  # the first byte not taken yet: parts[index][offset]
        while index < len(parts):
            if not self.flush():
                if taken:
                    return taken
                raise BlockingIOError
            chunk: list[bytes | bytearray | memoryview] = []
            room = ENCRYPT_STEP
            while index < len(parts) and room:
                part = parts[index]
                left = len(part) - offset
                if left <= room:
                    chunk.append(part if not offset else memoryview(part)[offset:])
                    room -= left
                    index, offset = index + 1, 0
                else:
                    chunk.append(memoryview(part)[offset : offset + room])
                    offset += room
                    room = 0
            self._obj.write(chunk[0] if len(chunk) == 1 else b"".join(chunk))
            taken += ENCRYPT_STEP - room
        with contextlib.suppress(BlockingIOError):
            self.flush()
        return taken

    def splice(self, pipe_fd: int, count: int) -> int:
        """Never called (``zero_copy`` is false): the bytes must be decrypted first."""
        raise OSError(errno.EOPNOTSUPP, "no splice through user-space TLS")

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        """No sendfile through user-space TLS: read the range and encrypt it."""
        taken = 0
        while taken < count:
            if not self.flush():
                if taken:
                    return taken
                raise BlockingIOError
            data = os.pread(in_fd, min(count - taken, ENCRYPT_STEP), offset + taken)
            if not data:
                break
            self._obj.write(data)
            taken += len(data)
        with contextlib.suppress(BlockingIOError):
            self.flush()
        return taken

    def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()  # queues close_notify; raises as the peer's has not come yet
        with contextlib.suppress(OSError):
            self.flush()
