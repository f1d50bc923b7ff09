"""xnbdd.systemd against real sockets: a real notify receiver, real fds passed to real children."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.systemd_fixtures import REPO, NotifyReceiver, free_port, missing_tools
from xnbdd.systemd import Notifier

# --------------------------------------------------------------------------------------------
# Notifier


class NewNotifier:
    """Makes notifiers for one test and closes them when it ends."""

    def __init__(self) -> None:
        self.made: list[Notifier] = []

    def __call__(self, *, unset_environment: bool = False) -> Notifier:
        notifier = Notifier(unset_environment=unset_environment)
        self.made.append(notifier)
        return notifier


@pytest.fixture
def new_notifier() -> Iterator[NewNotifier]:
    made = NewNotifier()
    yield made
    for notifier in made.made:
        notifier.close()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    r = NotifyReceiver()
    monkeypatch.setenv("NOTIFY_SOCKET", r.address)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    yield r
    r.close()


def test_ready_status_stopping_arrive_in_order_from_our_pid(
    new_notifier: NewNotifier, receiver: NotifyReceiver
) -> None:
    n = new_notifier()
    assert n.enabled
    n.status("target /srv/disk.img, 0 clients")
    n.ready()
    n.stopping()
    got = [receiver.recv(2) for _ in range(3)]
    assert [g.fields for g in got] == [
        {"STATUS": "target /srv/disk.img, 0 clients"},
        {"READY": "1"},
        {"STOPPING": "1"},
    ]
    assert {g.pid for g in got} == {os.getpid()}


def test_status_is_sent_only_when_it_changes(
    new_notifier: NewNotifier, receiver: NotifyReceiver
) -> None:
    n = new_notifier()
    for text in ["a", "a", "b", "b", "a"]:
        n.status(text)
    n.ready()  # a marker: everything before it has been sent
    got = [note.fields for note in receiver.drain()]
    assert got == [{"STATUS": "a"}, {"STATUS": "b"}, {"STATUS": "a"}, {"READY": "1"}]


def test_status_is_one_line(new_notifier: NewNotifier, receiver: NotifyReceiver) -> None:
    new_notifier().status("two\nlines")
    assert receiver.recv(2).fields == {"STATUS": "two lines"}


def test_reloading_carries_the_monotonic_clock(
    new_notifier: NewNotifier, receiver: NotifyReceiver
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    new_notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = receiver.recv(2).fields
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_watchdog_and_extend_timeout(new_notifier: NewNotifier, receiver: NotifyReceiver) -> None:
    n = new_notifier()
    n.watchdog()
    n.extend_timeout(2.5)
    assert receiver.recv(2).fields == {"WATCHDOG": "1"}
    assert receiver.recv(2).fields == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_path_notify_socket(
    new_notifier: NewNotifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = NotifyReceiver(address=str(tmp_path / "notify"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", r.address)
        new_notifier().ready()
        assert r.recv(2).fields == {"READY": "1"}
    finally:
        r.close()


def test_systemd_notify_tool_talks_to_the_same_receiver(receiver: NotifyReceiver) -> None:
    """The receiver understands what systemd's own client sends, so it is a fair stand-in."""
    tool = subprocess.Popen(["systemd-notify", "--ready", "--status=from the tool"])
    try:
        assert receiver.wait_for("READY", "1").fields["STATUS"] == "from the tool"
        receiver.wait_for("BARRIER", "1")  # closing the passed fd lets the tool return
        assert tool.wait(timeout=10) == 0
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def test_silent_without_systemd(new_notifier: NewNotifier, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = new_notifier()
    assert not n.enabled
    n.ready()
    n.status("x")
    n.watchdog()
    n.reloading()
    n.extend_timeout(1)
    n.stopping()


def test_a_vanished_receiver_does_not_raise(
    new_notifier: NewNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = NotifyReceiver()
    monkeypatch.setenv("NOTIFY_SOCKET", r.address)
    n = new_notifier()
    r.close()
    n.ready()
    n.stopping()


def test_unset_environment(
    new_notifier: NewNotifier, receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    n = new_notifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval() == 2.0
    n.ready()  # still works: the address was read once
    assert receiver.recv(2).fields == {"READY": "1"}


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("3000000", None, 1.5),
        ("3000000", "self", 1.5),
        ("3000000", "1", None),  # meant for another process
        (None, None, None),
        ("0", None, None),
        ("junk", None, None),
    ],
)
def test_watchdog_interval(
    new_notifier: NewNotifier,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert new_notifier().watchdog_interval() == expected


# --------------------------------------------------------------------------------------------
# inherited_sockets() in a child process, with descriptors passed the way systemd passes them

CHILD = """
import json, os, socket, sys
from xnbdd.systemd import SystemdEnvError, inherited_sockets
try:
    socks = inherited_sockets()
except SystemdEnvError as e:
    print("ERROR:", e)
    sys.exit(2)
out = []
for s in socks:
    entry = {"fd": s.sock.fileno(), "name": s.name, "listening": s.listening,
             "family": s.sock.family.name, "inheritable": os.get_inheritable(s.sock.fileno())}
    if not s.listening:
        entry["peer"] = list(s.sock.getpeername())[:2]
        s.sock.sendall(b"hello from the child")
    out.append(entry)
out.append({"env": sorted(k for k in os.environ if k.startswith("LISTEN_"))})
print(json.dumps(out))
"""

needs_activate = pytest.mark.skipif(
    bool(missing_tools("systemd-socket-activate")),
    reason="systemd-socket-activate (package systemd) is not installed",
)


def _activate(args: list[str]) -> subprocess.Popen[str]:
    """Run the child under systemd-socket-activate, which passes only the variables named by -E."""
    return subprocess.Popen(
        [
            "systemd-socket-activate",
            *args,
            "-E",
            f"PYTHONPATH={REPO}",
            "--",
            sys.executable,
            "-c",
            CHILD,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _connect_when_listening(host: str, port: int, proc: subprocess.Popen[str]) -> socket.socket:
    deadline = time.monotonic() + 10
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.connect((host, port))
            return s
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _report(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    result: list[dict[str, object]] = json.loads(out.splitlines()[-1])
    return result


@needs_activate
def test_listening_tcp4_tcp6_and_unix_with_names(tmp_path: Path) -> None:
    p4, p6 = free_port(), free_port("::1")
    path = tmp_path / "nbd.sock"
    proc = _activate(
        ["-l", f"127.0.0.1:{p4}", "-l", f"[::1]:{p6}", "-l", str(path), "--fdname=tcp4:tcp6:unix"]
    )
    first = _connect_when_listening("127.0.0.1", p4, proc)  # the launcher waits for a client
    try:
        report = _report(proc)
    finally:
        first.close()
    assert report == [
        {"fd": 3, "name": "tcp4", "listening": True, "family": "AF_INET", "inheritable": False},
        {"fd": 4, "name": "tcp6", "listening": True, "family": "AF_INET6", "inheritable": False},
        {"fd": 5, "name": "unix", "listening": True, "family": "AF_UNIX", "inheritable": False},
        {"env": []},
    ]


@needs_activate
def test_unnamed_socket_has_empty_name() -> None:
    port = free_port()
    proc = _activate(["-l", f"127.0.0.1:{port}"])
    first = _connect_when_listening("127.0.0.1", port, proc)
    try:
        report = _report(proc)
    finally:
        first.close()
    assert report == [
        {"fd": 3, "name": "", "listening": True, "family": "AF_INET", "inheritable": False},
        {"env": []},
    ]


@needs_activate
def test_connected_socket_from_accept_mode() -> None:
    port = free_port()
    launcher = _activate(["-l", f"127.0.0.1:{port}", "--accept", "--fdname=conn"])
    try:
        client = _connect_when_listening("127.0.0.1", port, launcher)
        with client:
            client.settimeout(10)
            greeting = b""
            while len(greeting) < 20:
                chunk = client.recv(64)
                assert chunk, "the child closed without writing"
                greeting += chunk
            assert greeting == b"hello from the child"
            local = client.getsockname()
            # The child closes the connection only by exiting, after its report is printed:
            # terminating the launcher before that could lose the report.
            assert client.recv(64) == b""
    finally:
        launcher.terminate()
        out, _ = launcher.communicate(timeout=10)
    # In --accept mode the child's stdout is the launcher's.
    report = json.loads([line for line in out.splitlines() if line.startswith("[")][-1])
    assert report == [
        {
            "fd": 3,
            "name": "conn",
            "listening": False,
            "family": "AF_INET",
            "inheritable": False,
            "peer": list(local),
        },
        {"env": []},
    ]


def _run_with_fds(fds: list[int], env: dict[str, str], *, own_pid: bool = True) -> tuple[int, str]:
    """Start the child with `fds` moved to 3, 4, ... and LISTEN_PID set by a shell to its own PID
    (exec keeps the PID), exactly as a service manager hands them over."""

    def move_fds() -> None:
        for target, fd in enumerate(fds, 3):
            os.dup2(fd, target)

    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env}
    prefix = "LISTEN_PID=$$; export LISTEN_PID; " if own_pid else ""
    proc = subprocess.run(
        ["sh", "-c", prefix + 'exec "$@"', "sh", sys.executable, "-c", CHILD],
        env=full_env,
        pass_fds=list(range(3, 3 + len(fds))),
        preexec_fn=move_fds,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return proc.returncode, proc.stdout.strip()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.create_server(("127.0.0.1", 0))
    yield s
    s.close()


def test_not_set_means_no_sockets() -> None:
    assert _run_with_fds([], {}, own_pid=False) == (0, '[{"env": []}]')


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("other_pid", "ERROR: LISTEN_PID=1 is not this process ("),
        ("no_pid", "ERROR: LISTEN_FDS=1 is set but LISTEN_PID is not"),
        ("zero_fds", "ERROR: LISTEN_FDS=0: no sockets were passed"),
        ("not_a_socket", "ERROR: fd 3 from LISTEN_FDS is not a socket"),
        ("closed_fd", "ERROR: fd 4 from LISTEN_FDS is not open"),
        ("datagram", "ERROR: fd 3 from LISTEN_FDS is not a stream socket"),
        ("names_mismatch", "ERROR: LISTEN_FDNAMES='a:b' has 2 names for LISTEN_FDS=1"),
        ("junk_count", "ERROR: LISTEN_FDS='x' is not a number"),
    ],
)
def test_bad_environment_is_one_clear_error(
    case: str, expected: str, listener: socket.socket, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with open(plain) as f, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        lfd = listener.fileno()
        own = True
        if case == "other_pid":
            fds, env, own = [lfd], {"LISTEN_FDS": "1", "LISTEN_PID": "1"}, False
        elif case == "no_pid":
            fds, env, own = [lfd], {"LISTEN_FDS": "1"}, False
        elif case == "zero_fds":
            fds, env = [], {"LISTEN_FDS": "0"}
        elif case == "not_a_socket":
            fds, env = [f.fileno()], {"LISTEN_FDS": "1"}
        elif case == "closed_fd":
            fds, env = [lfd], {"LISTEN_FDS": "2"}  # fd 4 is not passed
        elif case == "datagram":
            fds, env = [dgram.fileno()], {"LISTEN_FDS": "1"}
        elif case == "names_mismatch":
            fds, env = [lfd], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
        else:
            fds, env = [lfd], {"LISTEN_FDS": "x"}
        status, out = _run_with_fds(fds, env, own_pid=own)
    assert status == 2
    assert out.startswith(expected), out
    assert len(out.splitlines()) == 1


def test_a_full_queue_delays_instead_of_dropping(
    new_notifier: NewNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd reads its notify socket whenever it gets to it; the kernel queues only a few
    datagrams meanwhile. The notifier must wait for room, not lose READY=1 or STOPPING=1."""
    address = f"@xnbdd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as slow_manager:
        slow_manager.bind("\0" + address[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        n = new_notifier()

        def send_all() -> None:
            for i in range(30):
                n.status(f"step {i}")
            n.stopping()

        sender = threading.Thread(target=send_all)
        sender.start()
        time.sleep(0.3)  # the manager is busy; the queue fills up
        assert sender.is_alive()
        slow_manager.settimeout(5)
        got = [slow_manager.recv(4096).decode() for _ in range(31)]
        sender.join(5)
    assert got == [f"STATUS=step {i}" for i in range(30)] + ["STOPPING=1"]
