"""Clients kept across a restart in systemd's file-descriptor store (docs/handover.md).

Under systemd with a store (``$FDSTORE`` > 0: systemd 254 and later set it from
FileDescriptorStoreMax=, our units set it themselves for older versions), a stop hands the clients
over instead of closing them: each connection answers what it has read, stops at a request
boundary, and its socket goes to the store (``FDSTORE=1``) named ``xnbd-client-<pid>-<n>``. What
each client negotiated is written as one JSON object (name -> hand-off message, handoff.py's
format) into a memfd stored as ``xnbd-handover``. The next process finds both among its LISTEN_FDS
and serves those clients on in the transmission phase; whatever they sent meanwhile waits in the
socket. systemd releases the store when the service really stops (not when it restarts), so a
plain stop still ends every client: they see end of stream.

The next process takes everything out of the store (``FDSTOREREMOVE=1``) as it adopts it, so the
store holds descriptors only between two processes and never outlives a client; a crash closes
the clients as before. Outside systemd all of this is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from systemd import daemon as sd_daemon

__all__ = [
    "CLIENT_PREFIX",
    "STATE_NAME",
    "ClientKeeper",
    "FdStore",
    "Handover",
    "KeptFile",
    "StoredClient",
    "take_stored",
]

log = logging.getLogger("xnbdd")

CLIENT_PREFIX = "xnbd-client-"
FILE_PREFIX = "xnbd-file-"  # a file the clients' data lives in (a cow overlay), kept with them
STATE_NAME = "xnbd-handover"
STATE_VERSION = 1


def store_available() -> bool:
    """A service manager is listening and keeps descriptors for us."""
    try:
        size = int(os.environ.get("FDSTORE", "0"))
    except ValueError:
        return False
    return size > 0 and bool(os.environ.get("NOTIFY_SOCKET"))


def _notify(message: str, fds: list[int] | None = None) -> bool:
    """sd_pid_notify_with_fds(3) through python-systemd; False (and a warning) when it failed."""
    try:
        return bool(sd_daemon.notify(message, fds=fds or []))
    except OSError as err:
        log.warning("service manager refused %s: %s", message.split("\n", 1)[0], err)
        return False


def _remove(name: str) -> None:
    _notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


@dataclass
class StoredClient:
    """A client socket the previous process handed over, with what it negotiated."""

    sock: socket.socket
    name: str
    message: dict[str, Any]


@dataclass
class KeptFile:
    """A file kept open in the store for the clients (its descriptor holds its locks)."""

    fd: int
    info: dict[str, Any]


@dataclass
class Handover:
    """What the previous process left in the store."""

    clients: list[StoredClient] = field(default_factory=list)
    files: dict[str, KeptFile] = field(default_factory=dict)

    def take_file(self, key: str) -> KeptFile | None:
        """The kept file ``key``, now the caller's to use or close."""
        return self.files.pop(key, None)

    def drop_clients(self, why: str) -> None:
        """Close every stored client (their data could not be kept); they reconnect."""
        for client in self.clients:
            log.warning("stored client %s: %s; closed", client.name, why)
            client.sock.close()
        self.clients = []

    def close_files(self) -> None:
        for kept in self.files.values():
            os.close(kept.fd)
        self.files = {}


def take_stored(fds: list[tuple[int, str]]) -> tuple[Handover, list[tuple[int, str]]]:
    """Split the inherited descriptors: the clients handed over by the previous process (each
    with its hand-off message) and the files kept for them, and the rest (listening sockets and
    the like). A stored client without a state is closed and removed from the store."""
    states: dict[str, dict[str, Any]] = {}
    file_infos: dict[str, dict[str, Any]] = {}
    rest: list[tuple[int, str]] = []
    client_fds: list[tuple[int, str]] = []
    file_fds: list[tuple[int, str]] = []
    for fd, name in fds:
        if name == STATE_NAME:
            clients_state, files_state = _read_state(fd)
            states.update(clients_state)
            file_infos.update(files_state)
        elif name.startswith(CLIENT_PREFIX):
            client_fds.append((fd, name))
        elif name.startswith(FILE_PREFIX):
            file_fds.append((fd, name))
        else:
            rest.append((fd, name))
    files: dict[str, KeptFile] = {}
    for fd, name in file_fds:
        os.set_inheritable(fd, False)
        key = name[len(FILE_PREFIX) :]
        files[key] = KeptFile(fd, file_infos.get(key, {}))
    clients: list[StoredClient] = []
    for fd, name in client_fds:
        os.set_inheritable(fd, False)
        message = states.get(name)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            message = None
        else:
            if message is None or sock.type != socket.SOCK_STREAM:
                sock.close()
                message = None
        if message is None:
            log.warning("stored client %s: no state was handed over; closed", name)
            continue
        clients.append(StoredClient(sock, name, message))
    handover = Handover(clients, files)
    if not clients:
        handover.close_files()
    # The store is emptied at once: these are this process's descriptors now. Should it crash,
    # they must close (the clients see an error and reconnect), not go to the next process
    # with requests this one read and never answered.
    for _fd, name in fds:
        if name == STATE_NAME or name.startswith((CLIENT_PREFIX, FILE_PREFIX)):
            _remove(name)
    return handover, rest


def _read_state(fd: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    try:
        chunks = []
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        data = json.loads(b"".join(chunks))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        clients = {str(k): v for k, v in data["clients"].items() if isinstance(v, dict)}
        files = {str(k): v for k, v in data.get("files", {}).items() if isinstance(v, dict)}
        return clients, files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("handover state unreadable, its clients are closed: %s", err)
        return {}, {}
    finally:
        os.close(fd)


@dataclass
class FdStore:
    """What this process puts into the store when it stops: client sockets, their states, and
    the files their data lives in."""

    enabled: bool
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # handed over at this stop
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # kept at this stop
    _prefix: str = field(default_factory=lambda: f"{CLIENT_PREFIX}{secrets.token_hex(4)}-")
    _count: int = 0

    @classmethod
    def from_environment(cls) -> FdStore:
        return cls(enabled=store_available())

    def keep_file(self, key: str, fd: int, info: dict[str, Any]) -> bool:
        """Keep the open file ``fd`` for the clients handed over at this stop (the caller then
        closes its copy); False when the manager did not take it."""
        if not self.enabled:
            return False
        # FDPOLL=0: a regular file has nothing to poll.
        if not _notify(f"FDSTORE=1\nFDNAME={FILE_PREFIX}{key}\nFDPOLL=0", [fd]):
            return False
        self.files[key] = info
        return True

    def keeper(self, name: str | None = None) -> ClientKeeper:
        return ClientKeeper(self, name)

    def new_name(self) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}"

    def commit(self) -> None:
        """After the last connection: the states of the clients just handed over."""
        if not self.enabled or not self.states:
            return
        state = {"version": STATE_VERSION, "clients": self.states, "files": self.files}
        payload = json.dumps(state).encode()
        fd = os.memfd_create(STATE_NAME, os.MFD_CLOEXEC)
        try:
            os.write(fd, payload)
            # FDPOLL=0: a memfd has nothing to poll (only sockets and pipes report a hang-up).
            if _notify(f"FDSTORE=1\nFDNAME={STATE_NAME}\nFDPOLL=0", [fd]):
                log.info("handed %d clients over to the service manager", len(self.states))
        finally:
            os.close(fd)


class ClientKeeper:
    """One connection's way into the store at a stop."""

    def __init__(self, store: FdStore, name: str | None) -> None:
        self._store = store
        self.name = name  # the name it had in the store, for a client adopted from there

    def hand_over(self, fd: int, message: dict[str, Any]) -> bool:
        """Put the client socket ``fd`` into the store (the caller then closes its copy); False
        when the manager did not take it, and the client is to be closed."""
        store = self._store
        if not store.enabled:
            return False
        name = self.name or store.new_name()
        if not _notify(f"FDSTORE=1\nFDNAME={name}", [fd]):
            return False
        self.name = name
        store.states[name] = message
        return True
