"""systemd service protocol: inherited sockets (LISTEN_*), sd_notify (NOTIFY_SOCKET, WATCHDOG_*).

This is the only module that reads those environment variables (fdstore.py aside, which sends
descriptors with python-systemd's ``notify(..., fds=...)``). Everything here is a silent no-op
outside systemd, so the daemon calls it unconditionally. Both halves are a few lines of stdlib
rather than python-systemd's ``notify`` and ``listen_fds_with_names``, for three reasons:
reading the address once lets the notifier keep working after the variables are removed from
the environment (so that child processes never inherit them), which ``sd_notify`` (it reads
$NOTIFY_SOCKET on every call) cannot; a full notify queue delays a message by at most
NOTIFY_SEND_TIMEOUT, where libsystemd 252's send blocks the event loop for as long as the
manager does not read; and a malformed LISTEN_* gets a one-line error naming the variable, where
libsystemd answers EINVAL or silently nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from dataclasses import dataclass

__all__ = [
    "InheritedSocket",
    "Notifier",
    "SystemdEnvError",
    "adopt_sockets",
    "inherited_fds",
    "inherited_sockets",
]

log = logging.getLogger("xnbdd")

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start at 3
# The manager's datagram queue is short (net.unix.max_dgram_qlen = 10). Like sd_notify(3) we wait
# when it is full instead of dropping READY=1 or STOPPING=1, but never longer than this.
NOTIFY_SEND_TIMEOUT = 2.0
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdEnvError(Exception):
    """The environment set up by systemd (or a launcher imitating it) is inconsistent."""


@dataclass(frozen=True)
class InheritedSocket:
    sock: socket.socket
    name: str  # from LISTEN_FDNAMES, "" when the launcher gave none
    listening: bool  # SO_ACCEPTCONN: False means one already connected client (Accept=yes)


def inherited_sockets() -> list[InheritedSocket]:
    """The sockets passed by socket activation, in fd order; [] when there are none."""
    return adopt_sockets(inherited_fds())


def adopt_sockets(fds: list[tuple[int, str]]) -> list[InheritedSocket]:
    """Check that every inherited (fd, name) is a stream socket and take it over."""
    return [_adopt(fd, name) for fd, name in fds]


def inherited_fds() -> list[tuple[int, str]]:
    """The descriptors passed in LISTEN_FDS with their names, in fd order; [] when none.

    The LISTEN_* variables are removed from the environment first, even when they turn out to be
    invalid, so that no child process mistakes our descriptors for its own.
    """
    env = {name: os.environ.pop(name, None) for name in _LISTEN_VARS}
    fds_text, pid_text, names_text = env["LISTEN_FDS"], env["LISTEN_PID"], env["LISTEN_FDNAMES"]
    if fds_text is None:
        return []
    if pid_text is None:
        raise SystemdEnvError(f"LISTEN_FDS={fds_text} is set but LISTEN_PID is not")
    try:
        pid = int(pid_text)
    except ValueError:
        raise SystemdEnvError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if pid != os.getpid():
        raise SystemdEnvError(f"LISTEN_PID={pid} is not this process ({os.getpid()})")
    try:
        count = int(fds_text)
    except ValueError:
        raise SystemdEnvError(f"LISTEN_FDS={fds_text!r} is not a number") from None
    if count < 1:
        raise SystemdEnvError(f"LISTEN_FDS={fds_text}: no sockets were passed")
    names = names_text.split(":") if names_text else [""] * count
    if len(names) != count:
        raise SystemdEnvError(
            f"LISTEN_FDNAMES={names_text!r} has {len(names)} names for LISTEN_FDS={count}"
        )
    return list(enumerate(names, SD_LISTEN_FDS_START))


def _adopt(fd: int, name: str) -> InheritedSocket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise SystemdEnvError(f"fd {fd} from LISTEN_FDS is not open: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SystemdEnvError(f"fd {fd} from LISTEN_FDS is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()  # leave the descriptor alone; we only refuse it
        raise SystemdEnvError(f"fd {fd} from LISTEN_FDS is not a stream socket")
    os.set_inheritable(fd, False)  # CLOEXEC: the sockets are ours, not our children's
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    return InheritedSocket(sock=sock, name=name, listening=listening)


class Notifier:
    """sd_notify(3) messages to the service manager; every method is a no-op outside systemd."""

    def __init__(self, *, unset_environment: bool = False) -> None:
        """Read NOTIFY_SOCKET and WATCHDOG_* once; unset_environment removes them afterwards,
        for a process that starts children which must not talk to systemd in its name."""
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._warned = False
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(NOTIFY_SEND_TIMEOUT)
        self._watchdog_interval = _watchdog_interval()
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        if text == self._last_status:
            return
        self._last_status = text
        self._send("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        # systemd 253+ wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); 252 ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1 (half the manager's timeout), or None when not watched."""
        return self._watchdog_interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as e:
            # Losing a notification must never take the daemon down; say so once.
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager: %s", e.strerror or e)


def _watchdog_interval() -> float | None:
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000
