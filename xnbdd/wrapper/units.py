"""Export servers as systemd units: ``xnbd-export@INSTANCE.service`` (units/xnbd-export@.service).

With ``--systemd-units`` the wrapper does not spawn a child per export; it writes the export's
configuration file (xnbd-server's format, xnbdd/config.py) to ``EXPORTS_DIR/INSTANCE.conf`` and
asks systemd to (re)start the export's unit, which runs ``xnbd-server --config`` on that file.
Each export thus gets its own cgroup, limits, journal unit and restart policy.

The instance is the export name escaped by systemd's rules (``systemd-escape``, not ``--path``):
'/' becomes '-', every byte outside ``[A-Za-z0-9:_.]`` (and a leading '.') becomes ``\\xNN``. The
escaping is reversible, so two names never share a unit, and an escaped name has no '/', so it
cannot reach outside EXPORTS_DIR. The hand-off socket is named in the configuration file (a short
hashed path, as for children), since a long instance would not fit in a unix socket address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import unicodedata

import trio

from .registry import ExportEntry

log = logging.getLogger("xnbdd")

TEMPLATE_PREFIX = "xnbd-export@"
TEMPLATE_SUFFIX = ".service"
EXPORTS_DIR = "/run/xnbd-wrapper/exports"  # named by the template's ExecStart and ReadWritePaths
UNIT_NAME_MAX = 255  # systemd's limit for a whole unit name
SYSTEMCTL_TIMEOUT = 90.0  # above the template's start and stop timeouts

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
_MODE_KEYS = {"target": "target", "cow_target": "cow-target", "proxy": "proxy"}


class UnitError(Exception):
    """The export's unit cannot be named, configured, started or stopped; the message says why."""


def escape_instance(name: str) -> str:
    """``systemd-escape NAME``: the unit instance string for an export name."""
    out: list[str] = []
    for position, byte in enumerate(name.encode("utf-8", "surrogatepass")):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif char in _PLAIN and not (position == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unit_name(name: str) -> str:
    """The export's unit, ``xnbd-export@INSTANCE.service``."""
    unit = f"{TEMPLATE_PREFIX}{escape_instance(name)}{TEMPLATE_SUFFIX}"
    if len(unit) > UNIT_NAME_MAX:
        raise UnitError(
            f"export name too long for a systemd unit: {unit[:40]}... has {len(unit)} "
            f"characters, at most {UNIT_NAME_MAX}"
        )
    return unit


def config_path(unit: str, directory: str = EXPORTS_DIR) -> str:
    instance = unit.removeprefix(TEMPLATE_PREFIX).removesuffix(TEMPLATE_SUFFIX)
    return os.path.join(directory, f"{instance}.conf")


def export_config(
    entry: ExportEntry,
    handoff: str,
    *,
    max_queue_size: str | None = None,
    max_buf_size: str | None = None,
) -> str:
    """xnbd-server's configuration for ``entry``: the same server the child process would be."""
    values: list[tuple[str, str]] = [("mode", _MODE_KEYS[entry.server_mode])]
    values.append(("cache-image" if entry.mode == "proxy" else "image", entry.image))
    values.append(("readonly", "yes" if entry.readonly else "no"))
    values.append(("exportname", entry.name))
    if entry.description:
        values.append(("description", entry.description))
    values.append(("handoff-socket", handoff))
    if entry.mode == "proxy":
        values += [
            ("remote-host", entry.remote_host),
            ("remote-port", entry.remote_port),
            ("cache-bitmap", entry.bitmap),
            ("control-socket", entry.control_socket),
        ]
        if entry.remote_export_name:
            values.append(("target-exportname", entry.remote_export_name))
        if max_queue_size is not None:
            values.append(("max-queue-size", max_queue_size))
        if max_buf_size is not None:
            values.append(("max-buf-size", max_buf_size))
    lines = [f"# Written by xnbd-wrapper for {TEMPLATE_PREFIX}{TEMPLATE_SUFFIX}; do not edit."]
    for key, value in values:
        # One value per line: a line break would smuggle in another key.
        if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
            raise UnitError(f"export {entry.name!r}: {key} contains control characters")
        # Quotes keep blanks at the ends; the parser removes exactly one pair.
        lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def write_config(path: str, text: str) -> None:
    """Atomically: a temporary file beside it (mode 0600), fsync, rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".conf")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_config(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def systemctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run systemctl (as root it talks to PID 1 directly, no D-Bus or polkit needed)."""
    argv = ["systemctl", "--no-ask-password", *args]
    with trio.move_on_after(SYSTEMCTL_TIMEOUT):
        return await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, stdin=b""
        )
    raise UnitError(f"{' '.join(argv)}: no answer after {SYSTEMCTL_TIMEOUT:.0f} s")


async def failure_reason(unit: str) -> str:
    """Why a unit did not start, from systemd's own record of it."""
    shown = await systemctl("show", unit, "--property=Result,ExecMainCode,ExecMainStatus")
    props = dict(
        line.split("=", 1)
        for line in shown.stdout.decode(errors="replace").splitlines()
        if "=" in line
    )
    how = {"1": "exited with status", "2": "killed by signal", "3": "dumped core, signal"}
    reason = f"unit {unit} failed to start ({props.get('Result', '?')}"
    code = props.get("ExecMainCode", "0")
    if code in how:
        reason += f", main process {how[code]} {props.get('ExecMainStatus', '?')}"
    return reason + f"; see journalctl -u {unit})"


async def start_unit(unit: str) -> None:
    """``systemctl restart``: a unit still running an outdated configuration starts afresh, an
    inactive or failed one simply starts. Returns once systemd has it active (READY=1)."""
    done = await systemctl("restart", unit)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        reason = await failure_reason(unit)
        if detail and "not found" in detail[0]:
            reason = detail[0]  # the template is not installed
        raise UnitError(reason)


async def stop_unit(unit: str) -> None:
    done = await systemctl("stop", unit)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise UnitError(f"systemctl stop {unit}: {message or f'status {done.returncode}'}")
