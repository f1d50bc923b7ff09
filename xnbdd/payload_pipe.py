"""A large WRITE payload held in pipes between the client's socket and the image (splice).

Read with ``readv`` and written with ``pwrite``, a payload is copied twice: from the socket into
Python, then from Python into the page cache. ``splice`` moves the socket's pages into a pipe by
reference and from there copies them once, into the page cache, so a large write costs the
server about a fifth less CPU (bench/README.md, "Large writes by splice").

The connection's data-plane thread fills the pipes as the payload arrives and hands it, whole,
to the backend (``PipeSink``) under the export's pause gate, exactly where a payload in a buffer
would be written: a snapshot or a switch never sees half of it. A pipe holds a bounded number of
pieces, one per fragment the network delivered (a few KiB each on loopback, often one 1.5 KiB
segment from a network card), so a payload takes up to ``MAX_PIPES`` pipes; when they are all
full before it is whole, the data plane spills what they hold into a buffer and goes on as
without them. Only the first pipe outlives its payload: a connection between large writes holds
two descriptors for them, not eight.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios

from .backends import linux
from .tls import Transport

PIPE_SIZE = 1024 * 1024  # asked of F_SETPIPE_SZ: 256 pieces (the default pipe has 16)
MAX_PIPES = 4  # per connection: about 1.5 MiB in 1.5 KiB pieces, several MiB on loopback


class PipeFull(Exception):
    """Every pipe took all the pieces it can while the socket still holds bytes."""


class _Pipe:
    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            # refused (EPERM) once the user's pipes hold their share of memory
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            self.close()
            raise
        self.held = 0

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PayloadPipe:
    """One connection's pipes and the payload in them: ``head`` (the bytes that came in the
    same read as the request's header) and then ``held`` bytes in the pipes, in order."""

    def __init__(self, size: int = PIPE_SIZE, max_pipes: int = MAX_PIPES) -> None:
        self._size = size
        self._max_pipes = max_pipes
        self._pipes = [_Pipe(size)]
        self._filling = 0  # the pipe that takes the next bytes
        self._head = b""
        self.held = 0

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.close()

    def begin(self, head: bytes) -> None:
        if self.held:  # a payload never written (the connection was stopping)
            self.discard()
        self._head = head
        self._filling = 0
        for pipe in self._pipes[1:]:  # an idle connection keeps one pipe: descriptors are few
            pipe.close()
        del self._pipes[1:]

    def fill(self, transport: Transport, count: int) -> int:
        """Move up to ``count`` bytes from the client into the pipes (0: end of stream).
        BlockingIOError: the socket is empty; PipeFull: the pipes are."""
        while True:
            pipe = self._pipes[self._filling]
            try:
                moved = transport.splice(pipe.w, count)
            except BlockingIOError:
                # splice says the same for both: the socket's count of unread bytes tells which
                unread = fcntl.ioctl(transport.fd, termios.FIONREAD, b"\0" * 4)
                if not struct.unpack("i", unread)[0]:
                    raise
                self._next_pipe()
                continue
            pipe.held += moved
            self.held += moved
            return moved

    def _next_pipe(self) -> None:
        """Go on in the next pipe (made if need be), or PipeFull."""
        if self._filling + 1 == len(self._pipes):
            if len(self._pipes) == self._max_pipes:
                raise PipeFull
            try:
                self._pipes.append(_Pipe(self._size))
            except OSError:
                raise PipeFull from None
        self._filling += 1

    def write_to(self, fd: int, offset: int) -> None:
        """Write the whole payload at ``offset`` of ``fd``; after an error the rest is dropped,
        so the pipes are empty either way."""
        try:
            if self._head:
                linux.write_all(fd, self._head, offset)
                offset += len(self._head)
            for pipe in self._pipes[: self._filling + 1]:
                while pipe.held:
                    moved = os.splice(pipe.r, fd, pipe.held, offset_dst=offset)
                    if not moved:
                        raise OSError(errno.EIO, "the image took no bytes from the pipe")
                    pipe.held -= moved
                    self.held -= moved
                    offset += moved
        finally:
            self.discard()

    def take(self) -> bytearray:
        """The payload's bytes so far, out of the pipes into a buffer."""
        buf = bytearray(len(self._head) + self.held)
        buf[: len(self._head)] = self._head
        view = memoryview(buf)[len(self._head) :]
        for pipe in self._pipes[: self._filling + 1]:
            while pipe.held:
                got = os.readv(pipe.r, [view[: pipe.held]])
                pipe.held -= got
                view = view[got:]
        self.held = 0
        self.begin(b"")
        return buf

    def discard(self) -> None:
        """Drop what the pipes hold (a refused or failed write)."""
        for pipe in self._pipes[: self._filling + 1]:
            while pipe.held:
                pipe.held -= len(os.read(pipe.r, min(pipe.held, PIPE_SIZE)))
        self.held = 0
        self.begin(b"")
