"""The servers under fuzz, one set per mode, each with a guard: bytes that must never change.

- target: a writable ``--target`` (its image must keep its size: no write grows it) and a
  ``--target --readonly`` whose image must stay byte for byte the same;
- cow: ``--cow-target``; the base image must stay the same (writes go to the overlay);
- proxy: ``--proxy`` in front of our own writable ``--target`` origin; the origin image must stay
  the same (the proxy never writes to its origin);
- wrapper: ``xnbd-wrapper --cow`` serving one image; it must stay the same.

A write reaching a guard is a real bug, never a side effect of what the fuzzer itself asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.wire import Target
from tests.serverproc import running_server
from tests.wrapper.wrapperproc import running_wrapper

SIZE = 8 << 20
BUDGET = ("-B", "64M")  # a small byte budget makes the RSS bound tight
MODES = ("target", "cow", "proxy", "wrapper")


@dataclass
class Endpoint:
    """One export the fuzzer talks to."""

    port: int
    target: Target
    content: bytes | None = None  # what it reads as when nothing may change it (read-only)


@dataclass
class Rig:
    endpoints: list[Endpoint]
    pids: Callable[[], list[int]]  # every process serving them (RSS, liveness)
    guards: list[Callable[[], str]] = field(default_factory=list)  # "" while intact
    logs: Callable[[], str] = lambda: ""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(SIZE))
    return path


def unchanged(path: Path) -> Callable[[], str]:
    expected = _sha(path)
    return lambda: "" if _sha(path) == expected else f"{path.name} changed"


def _same_size(path: Path) -> Callable[[], str]:
    return lambda: "" if path.stat().st_size == SIZE else f"{path.name} is {path.stat().st_size}"


@contextlib.contextmanager
def rig(mode: str, work: Path) -> Iterator[Rig]:
    if mode == "target":
        writable, readonly = _image(work / "rw.img", 1), _image(work / "ro.img", 2)
        with (
            running_server("--target", *BUDGET, str(writable), tmp_path=work) as rw,
            running_server("--target", "--readonly", *BUDGET, str(readonly), tmp_path=work) as ro,
        ):
            yield Rig(
                [
                    Endpoint(rw.port, Target("", SIZE, True)),
                    Endpoint(ro.port, Target("", SIZE, False), readonly.read_bytes()),
                ],
                lambda: [rw.proc.pid, ro.proc.pid],
                [_same_size(writable), unchanged(readonly)],
                lambda: rw.log() + ro.log(),
            )
    elif mode == "cow":
        base = _image(work / "base.img", 3)
        (work / "cow").mkdir(exist_ok=True)
        cow_args = ("--cow-target", *BUDGET, "--cow-dir", str(work / "cow"), str(base))
        with running_server(*cow_args, tmp_path=work) as cow:
            yield Rig(
                [Endpoint(cow.port, Target("", SIZE, True))],
                lambda: [cow.proc.pid],
                [unchanged(base)],
                cow.log,
            )
    elif mode == "proxy":
        origin_image = _image(work / "origin.img", 4)
        files = [str(work / n) for n in ("proxy.cache", "proxy.bm", "proxy.ctl")]
        with running_server("--target", str(origin_image), tmp_path=work) as origin:
            proxy_args = (*BUDGET, "--proxy", "127.0.0.1", str(origin.port), *files)
            with running_server(*proxy_args, tmp_path=work) as proxy:
                yield Rig(
                    [Endpoint(proxy.port, Target("", SIZE, True))],
                    lambda: [proxy.proc.pid, origin.proc.pid],
                    [unchanged(origin_image)],
                    lambda: proxy.log() + origin.log(),
                )
    elif mode == "wrapper":
        base = _image(work / "wrapped.img", 5)
        with running_wrapper(work, "--cow", "--imgfile", str(base)) as wrapper:
            yield Rig(
                [Endpoint(wrapper.port, Target(str(base), SIZE, True))],
                lambda: [wrapper.proc.pid, *(pid for pid, _cmd in wrapper.export_servers())],
                [unchanged(base)],
                wrapper.log,
            )
    else:
        raise ValueError(f"unknown mode {mode!r}")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
