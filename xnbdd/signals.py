"""SIGTERM outside a daemon's signal receiver.

trio's signal receiver restores, when it closes in the final teardown, the handler it found: a
second SIGTERM then (systemd's stop after a timeout, a test's clean-up) must not kill the stop
already under way with the default action, and the interpreter's own finalisation restores the
default once more. A SIGTERM that comes before the receiver opens is remembered, and the daemon
stops as soon as its receiver runs.
"""

from __future__ import annotations

import signal

_came_early = False


def _remember(signum: int, frame: object) -> None:
    global _came_early
    _came_early = True


def catch_sigterm_outside_the_receiver() -> None:
    """Call before ``trio.run``."""
    signal.signal(signal.SIGTERM, _remember)


def sigterm_came_early() -> bool:
    """Whether a SIGTERM arrived while no receiver was open (the daemon should stop)."""
    return _came_early


def ignore_sigterm_after_the_run() -> None:
    """Call after ``trio.run``: the daemon has stopped, its exit status is its own."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
