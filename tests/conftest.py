"""Fixtures shared by tests in several modules."""

from __future__ import annotations

import array
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

# Property tests check what the code does, not how fast: hypothesis's default deadline (200 ms an
# example) failed them on a loaded machine, where one example can wait that long for a CPU.
settings.register_profile("xnbdd", deadline=None)
settings.load_profile("xnbdd")


class Manager:
    """The service manager's notify socket: every datagram, and the descriptors it carried."""

    def __init__(self) -> None:
        self.address = f"@xnbdd-fdstore-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.messages: list[tuple[dict[str, str], list[int]]] = []

    def take(self) -> list[tuple[dict[str, str], list[int]]]:
        """Read what has arrived (the notify calls are synchronous, so it is all there)."""
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
            except BlockingIOError:
                return self.messages
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((fields, list(fds)))

    def stored(self) -> dict[str, int]:
        """The store as systemd would hold it after these messages: name -> descriptor."""
        store: dict[str, int] = {}
        for fields, fds in self.take():
            name = fields.get("FDNAME", "")
            if fields.get("FDSTOREREMOVE") == "1" and name in store:
                os.close(store.pop(name))
            elif fields.get("FDSTORE") == "1":
                assert len(fds) == 1, fields
                store[name] = fds[0]
        return store

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    m = Manager()
    monkeypatch.setenv("NOTIFY_SOCKET", m.address)
    monkeypatch.setenv("FDSTORE", "16")
    yield m
    m.close()
