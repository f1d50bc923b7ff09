"""Import Debian's python3-libnbd (built for the system Python 3.11) from any CPython 3.11."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def import_nbd() -> ModuleType:
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)  # appended: the interpreter's own packages keep priority
    module: ModuleType = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    return module
