"""xnbdd.logs with the real destinations: a private systemd-journald read back with journalctl,
syslog through journald's /dev/log, plain stderr and a real log file."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import REPO, Journald

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("unshare") is None
    or not Path("/lib/systemd/systemd-journald").exists(),
    reason="needs root, unshare and systemd-journald (package systemd)",
)

# The program under test: sets up logging as asked (JSON in argv[1]) and logs what the daemon
# logs: a connect line with the client, an error with errno, a debug line, an exception.
CHILD = """
import json, logging, os, sys
from xnbdd.logs import reopen, set_context, setup_logging
args = json.loads(sys.argv[1])
rotate_to = args.pop("rotate_to", None)
setup_logging(**args)
set_context(XNBD_EXPORT="disk", XNBD_MODE="target")
log = logging.getLogger("xnbdd")
log.info("client connected", extra={"XNBD_CLIENT": "127.0.0.1:4242"})
log.debug("request details")
log.error("read failed at offset %d", 4096, extra={"XNBD_CLIENT": "[::1]:99", "XNBD_ERRNO": "5"})
try:
    raise ValueError("boom")
except ValueError:
    log.exception("unexpected failure")
if rotate_to:
    os.rename(args["logpath"], rotate_to)
    log.info("still writing to the old file")
    reopen()
    log.info("after reopen")
print(os.getpid())
"""


def run_child(
    args: dict[str, object],
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
    shell_prefix: str = "",
) -> tuple[int, str]:
    """Run CHILD (optionally behind `prefix` and a shell snippet); returns (pid, stderr).

    pid is 0 when stdout did not come back (systemd-cat sends it to the journal)."""
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [
        *(prefix or []),
        "sh",
        "-c",
        shell_prefix + 'exec "$@"',
        "sh",
        sys.executable,
        "-c",
        CHILD,
        json.dumps(args),
    ]
    proc = subprocess.run(
        cmd, env=full_env, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip() or 0), proc.stderr


@pytest.fixture(scope="module")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    j = Journald(tmp_path_factory.mktemp("journald"))
    yield j
    j.stop()


def by_message(entries: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(e["MESSAGE"]).splitlines()[0]: e for e in entries}


def test_under_journald_records_carry_structured_fields(journald: Journald) -> None:
    ident = f"xnbd-test-{uuid.uuid4().hex[:8]}"
    # systemd-cat connects stdout/stderr to journald's stream socket; JOURNAL_STREAM is then set
    # exactly as systemd sets it for StandardError=journal (device:inode of that stream).
    _, stderr = run_child(
        {"identifier": ident},
        prefix=[*journald.enter, "systemd-cat", "-t", f"{ident}-stream"],
        shell_prefix="JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); export JOURNAL_STREAM; ",
    )
    assert stderr == ""
    entries = journald.entries(f"SYSLOG_IDENTIFIER={ident}")
    got = by_message(entries)
    assert set(got) == {"client connected", "read failed at offset 4096", "unexpected failure"}
    assert all(e["_TRANSPORT"] == "journal" for e in entries)
    pid = entries[0]["_PID"]
    assert all(e["_PID"] == pid for e in entries)

    connected = got["client connected"]
    assert connected["PRIORITY"] == "6"
    assert connected["XNBD_CLIENT"] == "127.0.0.1:4242"
    assert connected["XNBD_EXPORT"] == "disk" and connected["XNBD_MODE"] == "target"
    assert connected["CODE_FUNC"] == "<module>" and connected["CODE_LINE"] == "9"
    assert connected["CODE_FILE"] == "<string>"
    assert connected["LOGGER"] == "xnbdd"
    assert "XNBD_ERRNO" not in connected

    failed = got["read failed at offset 4096"]
    assert failed["PRIORITY"] == "3"
    assert failed["XNBD_ERRNO"] == "5" and failed["XNBD_CLIENT"] == "[::1]:99"
    assert failed["XNBD_EXPORT"] == "disk"
    assert failed["CODE_ARGS"] == "(4096,)"

    crashed = got["unexpected failure"]
    assert crashed["PRIORITY"] == "3"
    assert "ValueError: boom" in str(crashed["EXCEPTION_TEXT"])
    assert "Traceback" in str(crashed["MESSAGE"])

    # The stream got the child's stdout (its PID) and no log line (that would be a duplicate,
    # unstructured copy), so the stream really was connected and our records avoided it.
    stream = journald.entries(f"SYSLOG_IDENTIFIER={ident}-stream")
    assert [(e["MESSAGE"], e["_TRANSPORT"]) for e in stream] == [(pid, "stdout")]


def test_verbose_adds_debug_records(journald: Journald) -> None:
    ident = f"xnbd-test-{uuid.uuid4().hex[:8]}"
    run_child(
        {"identifier": ident, "verbose": True},
        prefix=[*journald.enter, "systemd-cat", "-t", f"{ident}-stream"],
        shell_prefix="JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); export JOURNAL_STREAM; ",
    )
    debug = by_message(journald.entries(f"SYSLOG_IDENTIFIER={ident}"))["request details"]
    assert debug["PRIORITY"] == "7"


TEXT_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} xnbd-server\[(\d+)\] "


def test_plain_stderr_lines_without_journald() -> None:
    pid, stderr = run_child({})
    lines = stderr.splitlines()
    assert len(lines) == 3, stderr  # no debug line at the default level; one line per record
    assert re.fullmatch(
        TEXT_LINE + r"INFO: client connected \[client=127\.0\.0\.1:4242\]", lines[0]
    )
    assert re.fullmatch(
        TEXT_LINE + r"ERROR: read failed at offset 4096 \[client=\[::1\]:99 errno=5\]", lines[1]
    )
    assert re.fullmatch(
        TEXT_LINE + r"ERROR: unexpected failure \| Traceback .* \| ValueError: boom", lines[2]
    )
    assert all(f"[{pid}]" in line for line in lines)


def test_journal_stream_of_another_file_is_ignored() -> None:
    """JOURNAL_STREAM inherited from a parent whose stderr was the journal, while ours is a pipe."""
    _pid, stderr = run_child({}, env={"JOURNAL_STREAM": "9:12345"})
    assert "INFO: client connected [client=127.0.0.1:4242]" in stderr


def test_logpath_is_private_appended_and_reopened(tmp_path: Path) -> None:
    log = tmp_path / "xnbd.log"
    log_old = tmp_path / "xnbd.log.1"
    pid, stderr = run_child(
        {"logpath": str(log), "rotate_to": str(log_old)}, shell_prefix="umask 0; "
    )
    assert stderr == ""  # --logpath alone: the file only
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    old = log_old.read_text().splitlines()
    assert len(old) == 4 and old[-1].endswith("INFO: still writing to the old file")
    assert re.fullmatch(TEXT_LINE + r"INFO: client connected \[client=127\.0\.0\.1:4242\]", old[0])
    assert log.read_text().splitlines()[-1].endswith(f"[{pid}] INFO: after reopen")

    run_child({"logpath": str(log)})  # appends
    assert len(log.read_text().splitlines()) == 4


def test_unwritable_logpath_raises_oserror(tmp_path: Path) -> None:
    from xnbdd.logs import setup_logging

    with pytest.raises(OSError):
        setup_logging(logpath=str(tmp_path / "missing-dir" / "xnbd.log"))


# syslog: journald's /dev/log socket, made visible at /dev/log inside a nested namespace only.
WITH_DEV_LOG = (
    "mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3"
    " && ln -s /run/systemd/journal/dev-log /dev/log && "
)


def syslog_entries(journald: Journald, ident: str) -> dict[str, dict[str, object]]:
    return by_message(
        [
            e
            for e in journald.entries("_TRANSPORT=syslog")
            if str(e.get("SYSLOG_IDENTIFIER")) == ident
        ]
    )


def test_syslog_facility_daemon(journald: Journald, tmp_path: Path) -> None:
    ident = f"xnbd-test-{uuid.uuid4().hex[:8]}"
    pid, stderr = run_child(
        {"syslog": True, "identifier": ident},
        prefix=[*journald.enter, "unshare", "-m"],
        shell_prefix=WITH_DEV_LOG,
    )
    assert stderr == ""  # --syslog alone: syslog only
    got = syslog_entries(journald, ident)
    connected = got["client connected [client=127.0.0.1:4242]"]
    assert connected["SYSLOG_FACILITY"] == "3" and connected["PRIORITY"] == "6"
    assert connected["SYSLOG_PID"] == str(pid)
    assert got["read failed at offset 4096 [client=[::1]:99 errno=5]"]["PRIORITY"] == "3"


def test_syslog_and_logpath_together(journald: Journald, tmp_path: Path) -> None:
    ident = f"xnbd-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "both.log"
    _pid, stderr = run_child(
        {"syslog": True, "identifier": ident, "logpath": str(log)},
        prefix=[*journald.enter, "unshare", "-m"],
        shell_prefix=WITH_DEV_LOG,
    )
    assert stderr == ""
    assert "client connected [client=127.0.0.1:4242]" in syslog_entries(journald, ident)
    assert "INFO: client connected" in log.read_text()


def test_without_usable_stderr_the_default_is_syslog(journald: Journald) -> None:
    """--inetd / --daemonize: stderr may be the client's socket or /dev/null."""
    ident = f"xnbd-test-{uuid.uuid4().hex[:8]}"
    _pid, stderr = run_child(
        {"identifier": ident, "stderr_usable": False},
        prefix=[*journald.enter, "unshare", "-m"],
        shell_prefix=WITH_DEV_LOG,
    )
    assert stderr == ""
    assert "client connected [client=127.0.0.1:4242]" in syslog_entries(journald, ident)


def test_set_context_rejects_names_journald_would_drop() -> None:
    from xnbdd.logs import set_context

    with pytest.raises(ValueError, match="not a journal field name"):
        set_context(xnbd_export="disk")
