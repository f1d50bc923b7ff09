"""The real daemon talking to a real NOTIFY_SOCKET receiver: readiness, status, watchdog, reload,
stop. The receiver checks the sender's PID as systemd does (NotifyAccess=main)."""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_command, daemon_env
from tests.e2e.systemd_fixtures import NotifyReceiver, free_port, wait_for_port

pytestmark = pytest.mark.e2e


class Daemon:
    def __init__(self, image: Path, notify: NotifyReceiver, *args: str, **env: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            daemon_command(
                "--target", str(image), "--lport", str(self.port), "--laddr", "127.0.0.1", *args
            ),
            env=daemon_env(NOTIFY_SOCKET=notify.address, **env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


Start = Callable[..., Daemon]


@pytest.fixture
def start(image: Path, notify: NotifyReceiver) -> Iterator[Start]:
    """start(*args, **env) runs the daemon on `image`, reporting to `notify`; killed at the
    end."""
    started: list[Daemon] = []

    def run(*args: str, **env: str) -> Daemon:
        started.append(Daemon(image, notify, *args, **env))
        return started[-1]

    yield run
    for d in started:
        d.stop()


def nbd_handshake(port: int) -> bytes:
    """Connect once and read the server's first 8 bytes ("NBDMAGIC"); no retry, no waiting."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(8, socket.MSG_WAITALL)


def test_ready_only_when_serving_then_status_and_stopping(
    start: Start, notify: NotifyReceiver
) -> None:
    d = start()
    ready = notify.wait_for("READY", "1", timeout=20)
    # The moment READY=1 arrives, a client is served: no retry loop is needed.
    assert nbd_handshake(d.port) == b"NBDMAGIC"
    assert ready.pid == d.proc.pid
    before_ready = notify.received[: notify.received.index(ready)]
    assert all("READY" not in n.fields for n in before_ready)

    status = notify.wait_for("STATUS", timeout=5).fields["STATUS"]
    assert status.startswith("target ") and "0 clients" in status

    d.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", "1", timeout=10)
    assert stopping.pid == d.proc.pid
    _, err = d.proc.communicate(timeout=15)
    assert d.proc.returncode == 0, err


def test_status_counts_clients(start: Start, notify: NotifyReceiver) -> None:
    d = start()
    notify.wait_for("READY", "1", timeout=20)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as client:
        assert client.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        notify.wait_for("STATUS", lambda text: text.endswith(": 1 client"))
    notify.wait_for("STATUS", lambda text: text.endswith(": 0 clients"))


def test_watchdog_pings_at_half_the_timeout(start: Start, notify: NotifyReceiver) -> None:
    d = start(WATCHDOG_USEC="400000")
    notify.wait_for("READY", "1", timeout=20)
    pings = [n for n in notify.collect(2.0) if "WATCHDOG" in n.fields]
    assert all(p.pid == d.proc.pid and p.fields == {"WATCHDOG": "1"} for p in pings)
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert 8 <= len(pings) <= 12, gaps
    assert max(gaps) < 0.4  # always inside WATCHDOG_USEC
    assert 0.15 < sum(gaps) / len(gaps) < 0.3


def test_watchdog_meant_for_another_process_is_ignored(
    start: Start, notify: NotifyReceiver
) -> None:
    start(WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    notify.wait_for("READY", "1", timeout=20)
    assert not [n for n in notify.collect(0.6) if "WATCHDOG" in n.fields]


def test_sighup_reloads_between_reloading_and_ready(start: Start, notify: NotifyReceiver) -> None:
    d = start()
    notify.wait_for("READY", "1", timeout=20)
    notify.drain(quiet=0.2)
    d.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", timeout=10)
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
    assert notify.wait_for("READY", "1", timeout=10).pid == d.proc.pid
    assert nbd_handshake(d.port) == b"NBDMAGIC"


def test_outside_systemd_nothing_breaks(image: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        daemon_command("--target", str(image), "--lport", str(port), "--laddr", "127.0.0.1"),
        env=daemon_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        assert nbd_handshake(port) == b"NBDMAGIC"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "notify" not in err.lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_follows_a_background_snapshot(
    start: Start, notify: NotifyReceiver, image: Path
) -> None:
    """ext4 cannot reflink: STATUS= says the copy runs (and how far), then that it is over."""
    d = start("--snapshot-rate", "16M")  # 64 MiB: about 4 s
    notify.wait_for("READY", "1", timeout=20)
    d.proc.send_signal(signal.SIGUSR1)
    running = notify.wait_for("STATUS", lambda text: "copied in the background" in text)
    text = running.fields["STATUS"]
    assert text.startswith("target ") and ".snapshot." in text, text
    notify.wait_for("STATUS", lambda text: "snapshot" not in text, timeout=30)
    taken = [p.name for p in image.parent.iterdir() if ".snapshot." in p.name]
    assert len(taken) == 1 and not taken[0].endswith(".partial"), taken
