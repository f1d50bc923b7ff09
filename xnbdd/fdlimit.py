"""Descriptors for every client: the soft limit on open files raised to the hard one at start.

systemd starts a service with a soft ``RLIMIT_NOFILE`` of 1024 (the hard one is 524288 by
default), because programs that use ``select()`` break past 1024, and expects a program that
needs more to raise its soft limit itself. The daemon never uses ``select()`` (epoll, poll), and
each client costs it a socket and, while it sends large writes, a pipe or more
(payload_pipe.py): a thousand clients would run out at 1024. The hard limit is the
administrator's (``LimitNOFILE=``); nothing goes past it.
"""

from __future__ import annotations

import resource


def raise_open_files_limit() -> int:
    """Raise the soft limit to the hard one (or the kernel's ``nr_open`` when that is
    unlimited); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft  # a sandbox that refuses: the limit stays what it was
        return hard
    return soft
