"""The wrapper's control protocol: the original's text dialogue (docs/compat.md §8.2).

The wrapper greets, then writes the prompt ``(xnbd) `` before every command. One command per line
(at most 1023 characters), words separated by single spaces, arguments percent-decoded. After
each command except ``quit`` comes ``return code N``. The original's xnbd-wrapper-ctl, our
Python 3 one, and a human with ``socat`` can all talk to it.

Only root and the wrapper's own user may talk to it (SO_PEERCRED), whatever the socket's mode.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import unquote

import trio

from ..listeners import STREAM_ERRORS, peer_allowed

log = logging.getLogger("xnbdd")

GREETING = '"help" command displays help for other commands\n'
PROMPT = "(xnbd) "
MAX_LINE = 1023
MAX_CONNECTIONS = 8

HELP = """\
list                                    list exports
add-target NAME FILE                    add a target export
add FILE | add NAME FILE                (deprecated) add a target export
add-proxy NAME HOST PORT CACHE BITMAP CTL [REMOTE_NAME]
                                        add a proxy export
del-exportname NAME                     remove an export (its server is stopped)
del-file FILE                           remove the exports of an image
del INDEX                               (deprecated) remove an export by index
bgctl-query NAME                        proxy status
bgctl-cache-all NAME                    fetch every block of a proxy export
bgctl-switch NAME                       turn a fully cached proxy export into a target
bgctl-reconnect NAME HOST PORT [REMOTE_NAME]
                                        connect a proxy export to another upstream
save                                    write the state database now
shutdown                                stop every export and the wrapper
orphan                                  stop the wrapper, leave export servers running
help                                    this text
quit                                    close this connection
"""

Write = Callable[[str], Awaitable[None]]


class CommandError(Exception):
    """A command failed; the message is shown and the return code is 1."""


class Commands(Protocol):
    """What the wrapper offers its control connections. Each returns the return code; output
    goes through ``write``."""

    async def list_exports(self, write: Write) -> int: ...

    async def add_target(self, name: str, path: str, write: Write) -> int: ...

    async def add_proxy(self, args: list[str], write: Write) -> int: ...

    async def remove(self, how: str, key: str, write: Write) -> int: ...

    async def bgctl(self, command: str, args: list[str], write: Write) -> int: ...

    async def save(self, write: Write) -> int: ...

    def shutdown(self, orphan: bool) -> None: ...


def decode_args(words: list[str]) -> list[str]:
    # unquote keeps malformed %-sequences literally, as the original does
    return [unquote(w, errors="surrogateescape") for w in words]


class ControlServer:
    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self.connections = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        async def write(text: str) -> None:
            await stream.send_all(text.encode("utf-8", "surrogateescape"))

        try:
            if not peer_allowed(stream.socket):
                await write("permission denied\n")
                return
            if self.connections >= MAX_CONNECTIONS:
                await write("too many connections\n")
                return
            self.connections += 1
            try:
                await self._dialogue(stream, write)
            finally:
                self.connections -= 1
        except STREAM_ERRORS:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _dialogue(self, stream: trio.SocketStream, write: Write) -> None:
        await write(GREETING + PROMPT)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if len(buffer) > MAX_LINE:
                    await write("command too long\n")
                    return
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r")
            if len(raw) > MAX_LINE:
                await write("command too long\nreturn code 1\n" + PROMPT)
                continue
            if not line.strip():
                await write(PROMPT)
                continue
            words = line.split(" ")
            command, args = words[0], decode_args(words[1:])
            if command == "quit":
                return
            try:
                code = await self._run(command, args, write)
            except CommandError as err:
                await write(f"{err}\n")
                code = 1
            await write(f"return code {code}\n" + PROMPT)
            if command in ("shutdown", "orphan"):
                # Only now: stopping the wrapper cancels this connection too.
                self.commands.shutdown(orphan=command == "orphan")
                return

    async def _run(self, command: str, args: list[str], write: Write) -> int:
        c = self.commands

        def want(low: int, high: int) -> None:
            if not low <= len(args) <= high:
                raise CommandError(f"{command}: wrong number of arguments (see help)")

        if command == "help":
            await write(HELP)
            return 0
        if command == "list":
            want(0, 0)
            return await c.list_exports(write)
        if command == "add-target":
            want(2, 2)
            return await c.add_target(args[0], args[1], write)
        if command == "add":
            want(1, 2)
            return await c.add_target(args[0], args[-1], write)
        if command == "add-proxy":
            want(6, 7)
            return await c.add_proxy(args, write)
        if command in ("del", "del-file", "del-exportname"):
            want(1, 1)
            return await c.remove(command, args[0], write)
        if command in ("bgctl-query", "bgctl-cache-all", "bgctl-switch"):
            want(1, 1)
            return await c.bgctl(command, args, write)
        if command == "bgctl-reconnect":
            want(3, 4)
            return await c.bgctl(command, args, write)
        if command == "save":
            want(0, 0)
            return await c.save(write)
        if command == "shutdown":
            await write("All images terminated\n")
            return 0
        if command == "orphan":
            return 0
        await write("unknown command\n")
        return 1
