"""Is the storage behind a path a spinning disk? The answer sets NBD_FLAG_ROTATIONAL, which lets
a client (the Linux nbd driver, qemu) schedule its requests for seeks (docs/protocol-rules.md,
rule 22).

A block device answers for itself; a regular file for the device of its file system. The kernel
says it in sysfs: /sys/dev/block/MAJ:MIN/queue/rotational. A partition has no queue of its own,
so its disk (the parent directory in sysfs) answers. Anything sysfs does not describe (tmpfs,
overlayfs, btrfs's anonymous device numbers, a missing /sys) counts as not rotational: the flag
is a hint, and claiming seeks that do not exist would only slow a client down.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYSFS = Path("/sys")


def device_rotational(major: int, minor: int, sysfs: Path = SYSFS) -> bool | None:
    """The queue/rotational of block device MAJ:MIN (its disk's, for a partition); None when
    sysfs does not know the device."""
    try:
        node = (sysfs / "dev" / "block" / f"{major}:{minor}").resolve(strict=True)
    except OSError:
        return None
    for candidate in (node, node.parent):  # a partition's disk is its parent directory
        try:
            text = (candidate / "queue" / "rotational").read_text()
        except OSError:
            continue
        return text.strip() == "1"
    return None


def is_rotational(path: str, sysfs: Path = SYSFS) -> bool:
    """True when ``path`` (a block device, or a file on one) is on a rotational device."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    return bool(device_rotational(os.major(dev), os.minor(dev), sysfs))
