"""The real daemon logging into a real systemd-journald (private mount namespace), read back with
journalctl -o json: structured fields on every line, one line per connection event and error,
nothing per request."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_command, daemon_env
from tests.e2e.systemd_fixtures import Journald, free_port, missing_tools, wait_for_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(missing_tools("systemd-cat", "journalctl", "nbdcopy")),
        reason="needs systemd-cat, journalctl (systemd) and nbdcopy (libnbd-bin)",
    ),
]

# stderr becomes a journal stream (systemd-cat) and JOURNAL_STREAM names it, exactly what
# StandardError=journal gives a service. In a nested mount namespace the image's directory is
# read-only while the image itself stays writable, so a snapshot (SIGUSR1, written next to the
# image) fails for real with EROFS.
SCRIPT = (
    'mount --bind "$IMAGE_DIR" "$IMAGE_DIR" && mount --bind "$IMAGE" "$IMAGE"'
    ' && mount -o remount,bind,ro "$IMAGE_DIR"'
    " && JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) && export JOURNAL_STREAM"
    ' && exec "$@"'
)


def wait_for_entry(journald: Journald, pid: int, message: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        for entry in journald.entries(f"_PID={pid}"):
            if str(entry["MESSAGE"]).startswith(message):
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no journal entry {message!r} from {pid}")
        time.sleep(0.1)


def test_daemon_fields_in_the_journal(journald: Journald, tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    image = image_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    port = free_port()
    cmd = daemon_command(
        "--target", str(image), "--exportname", "disk", "--lport", str(port), "--laddr", "127.0.0.1"
    )
    proc = subprocess.Popen(
        [*journald.enter, "systemd-cat", "-t", "xnbd-stream", "unshare", "-m",
         "bash", "-c", SCRIPT, "bash", *cmd],
        env=daemon_env(IMAGE_DIR=str(image_dir), IMAGE=str(image)),
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port)  # one connection without NBD traffic
        data = tmp_path / "data.bin"
        data.write_bytes(b"\x5a" * (1 << 20))
        subprocess.run(["nbdcopy", str(data), f"nbd://127.0.0.1:{port}/disk"], check=True)
        proc.send_signal(signal.SIGUSR1)
        wait_for_entry(journald, proc.pid, "snapshot failed")
        proc.send_signal(signal.SIGUSR2)
        wait_for_entry(journald, proc.pid, "SIGUSR2")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    entries = journald.entries(f"_PID={proc.pid}")
    assert entries, "the daemon wrote nothing to the journal"
    for e in entries:
        assert e["_TRANSPORT"] == "journal", e  # structured API, not the text stream
        assert e["SYSLOG_IDENTIFIER"] == "xnbd-server"
        assert e["XNBD_EXPORT"] == "disk" and e["XNBD_MODE"] == "target"
        assert {"PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC"} <= set(e)
    by_text = {str(e["MESSAGE"]): e for e in entries}

    # One line per connect and per disconnect, each naming the client; nothing per request
    # although nbdcopy sent 1 MiB of writes.
    with_client = [e for e in entries if "XNBD_CLIENT" in e]
    events = sorted(str(e["MESSAGE"]) for e in with_client)
    assert events.count("client connected") == events.count("client disconnected") >= 2
    assert len(with_client) == len(events) and set(events) == {
        "client connected",
        "client disconnected",
    }
    assert all(str(e["XNBD_CLIENT"]).startswith("127.0.0.1:") for e in with_client)
    assert all(e["PRIORITY"] == "6" for e in with_client)

    failed = next(e for text, e in by_text.items() if text.startswith("snapshot failed"))
    assert failed["PRIORITY"] == "3" and failed["XNBD_ERRNO"] == "30"  # EROFS
    switch = next(e for text, e in by_text.items() if text.startswith("SIGUSR2"))
    assert "target" in str(switch["MESSAGE"])
    assert str(switch["CODE_FILE"]).endswith("xnbdd/operations.py")  # SIGUSR2 is served there

    # The text stream carried nothing: every record went through the structured API.
    assert journald.entries("SYSLOG_IDENTIFIER=xnbd-stream") == []
