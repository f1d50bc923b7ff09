"""What every xnbdd program's command line shares: one-line usage errors, start-up failures
reported as one line, and detaching from the terminal."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from ..systemd import SystemdEnvError

# The LISTEN_FDNAMES name (FileDescriptorName=) of a control socket passed by systemd.
CONTROL_FD_NAME = "control"


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def detach() -> None:
    """Classic double fork. Paths are already absolute, so chdir("/") changes no meaning."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))


EXPECTED_FAILURES = (OSError, ValueError, SystemdEnvError)


def first_failure(err: BaseException) -> BaseException | None:
    """The expected start-up failure inside ``err`` (possibly wrapped by a nursery), if any."""
    if isinstance(err, EXPECTED_FAILURES):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            found = first_failure(inner)
            if found is not None:
                return found
    return None


def describe_error(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)
