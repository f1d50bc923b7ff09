"""How scripts outside systemd follow a daemon's life: a PID file that appears once clients can
connect and goes when the daemon stops, and --exit-with-parent, which stops the daemon when the
process that started it exits (the conventions of nbdkit and qemu-nbd)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import tempfile

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PidFile:
    """``path`` holds this process's PID from ``write`` until ``remove``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = False

    def write(self) -> None:
        """Atomically: a reader sees no file or the whole PID, never a partial line."""
        directory = os.path.dirname(self.path) or "."
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pid-")
        except OSError as err:  # named by the path the user gave, not the temporary's
            raise OSError(err.errno, err.strerror, self.path) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.chmod(tmp, 0o644)  # readable by scripts, as pid files are
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.written = True

    def remove(self) -> None:
        """Only our own file: another instance may have taken the path since."""
        if not self.written:
            return
        self.written = False
        try:
            with open(self.path) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.path)
        except OSError:
            pass


def exit_with_parent(parent: int) -> None:
    """SIGTERM this process (a graceful stop) when its parent exits; ``parent`` is the PID the
    process started under, so a parent that is already gone is caught too. OSError where the
    kernel cannot do it (not Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"--exit-with-parent: prctl: {os.strerror(err)}")
    if os.getppid() != parent:  # it exited before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
