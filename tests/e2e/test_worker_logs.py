"""Worker processes (``--workers``) log where the daemon logs: into a real systemd-journald
with the daemon's fields and their own, and into the --logpath file, which a SIGHUP reopens in
every process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_command, daemon_env
from tests.e2e.systemd_fixtures import Journald, free_port, missing_tools, wait_for_port
from tests.rawnbd import RawClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(missing_tools("systemd-cat", "journalctl")),
        reason="needs systemd-cat and journalctl (systemd)",
    ),
]

BAD_MAGIC = b"\x00" * 28  # a request header that is not one: the plane closes and says why
CLOSING = "closing connection: bad request magic"
STARTS_WITHIN = 30.0  # worker processes are fresh interpreters


def wait_until(condition: Callable[[], object], what: str, timeout: float = STARTS_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def workers_of(pid: int) -> list[int]:
    """Child processes of any of the daemon's threads (trio starts them from one of its own)."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def closing(journald: Journald) -> list[dict[str, object]]:
    return [e for e in journald.entries() if str(e["MESSAGE"]).startswith(CLOSING)]


def send_bad_magic_from_a_worker(port: int, ready: Callable[[], bool]) -> None:
    """Two connections make the daemon start its workers; once they are ready, a third
    connection is served by a worker, which closes it for a bad request and logs that."""
    first = [RawClient(port) for _ in range(2)]
    for client in first:
        client.go("disk")
    wait_until(ready, "the workers")
    third = RawClient(port)
    third.go("disk")
    third.send(BAD_MAGIC)
    assert third.at_eof()
    for client in (*first, third):
        client.close()


def test_workers_log_into_the_journal_with_the_daemons_fields(
    journald: Journald, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    cmd = daemon_command(
        "--target", str(image), "--exportname", "disk", "--lport", str(port),
        "--laddr", "127.0.0.1", "--workers", "2",
    )  # fmt: skip
    script = (
        'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) && export JOURNAL_STREAM && exec "$@"'
    )
    proc = subprocess.Popen(
        [*journald.enter, "systemd-cat", "-t", "xnbd-stream", "bash", "-c", script, "bash", *cmd],
        env=daemon_env(),
    )
    try:
        wait_for_port("127.0.0.1", port)
        daemon = proc.pid

        def ready() -> bool:
            return any(
                str(e["MESSAGE"]).endswith("worker processes ready")
                for e in journald.entries(f"_PID={daemon}")
            )

        send_bad_magic_from_a_worker(port, ready)
        wait_until(lambda: closing(journald), "the worker's entry", timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [entry] = closing(journald)
    assert entry["_PID"] != str(proc.pid)  # a worker's, not the daemon's
    assert entry["XNBD_WORKER"] == entry["_PID"]
    assert entry["_TRANSPORT"] == "journal"  # structured, not a line of the stderr stream
    assert entry["SYSLOG_IDENTIFIER"] == "xnbd-server"
    assert entry["XNBD_EXPORT"] == "disk" and entry["XNBD_MODE"] == "target"
    assert str(entry["XNBD_CLIENT"]).startswith("127.0.0.1:")
    assert entry["PRIORITY"] == "4"
    assert journald.entries("SYSLOG_IDENTIFIER=xnbd-stream") == []


def test_workers_append_to_the_log_file_and_reopen_it_on_sighup(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    logfile, rotated = tmp_path / "xnbd.log", tmp_path / "xnbd.log.1"
    port = free_port()
    cmd = daemon_command(
        "--target", str(image), "--exportname", "disk", "--lport", str(port),
        "--laddr", "127.0.0.1", "--workers", "2", "--logpath", str(logfile),
    )  # fmt: skip
    errors = tmp_path / "stderr"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen(cmd, env=daemon_env(), stderr=stderr)
    try:
        wait_for_port("127.0.0.1", port)

        def ready() -> bool:
            return "worker processes ready" in logfile.read_text()

        send_bad_magic_from_a_worker(port, ready)
        wait_until(lambda: CLOSING in logfile.read_text(), "the worker's line", timeout=10)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        [line] = [line for line in logfile.read_text().splitlines() if CLOSING in line]
        assert any(f"xnbd-server[{pid}] WARNING: {CLOSING}" in line for pid in workers), line

        os.rename(logfile, rotated)  # logrotate moves it, then SIGHUP
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: logfile.exists() and "reloaded" in logfile.read_text(), "reload")
        send_bad_magic_from_a_worker(port, lambda: True)
        wait_until(lambda: CLOSING in logfile.read_text(), "the line in the new file", timeout=10)
        [line] = [line for line in logfile.read_text().splitlines() if CLOSING in line]
        assert any(f"xnbd-server[{pid}] WARNING: {CLOSING}" in line for pid in workers), line
        assert rotated.read_text().count(CLOSING) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert errors.read_text() == ""  # nothing went to stderr
    assert os.stat(logfile).st_mode & 0o777 == 0o600
