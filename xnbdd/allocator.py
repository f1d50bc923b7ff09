"""glibc's allocator, kept from hoarding memory: at most two arenas for the whole process.

glibc gives threads their own malloc arenas (up to eight per core). Each connection's data
plane is a thread, so the READ data and WRITE payloads of busy connections end up spread over
many arenas, and each arena keeps what was freed in it: the wire fuzzer (docs/fuzzing.md) grew
a proxy with ``-B 64M`` to 700 MiB that way, against 160 MiB with two arenas. Every allocation of
Python objects happens under the interpreter lock anyway, so more arenas buy no parallelism.
An administrator's ``MALLOC_ARENA_MAX`` wins.
"""

from __future__ import annotations

import ctypes
import os

ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


def limit_arenas(count: int = ARENAS) -> bool:
    """Call before the first thread starts; False where not applied (not glibc, or set in the
    environment)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no arenas to limit)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))
