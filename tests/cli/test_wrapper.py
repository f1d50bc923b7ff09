"""xnbd-wrapper and xnbd-wrapper-ctl end to end, with real NBD clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.libnbd import import_nbd
from tests.serverproc import free_port, server_env
from tests.wrapper.wrapperproc import (
    WRAPPER,
    alive,
    running_wrapper,
    start_wrapper,
    wrapper_args,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def run(*cmd: str, timeout: float = 60) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout


def image(path: Path, size: int = 8 * MiB, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return path


def test_nbdinfo_lists_every_export_with_descriptions(tmp_path: Path) -> None:
    need("nbdinfo")
    a = image(tmp_path / "a.img", 4 * MiB)
    b = image(tmp_path / "b.img", 8 * MiB)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "described.conf").write_text(f"image = {b}\ndescription = the b disk\nreadonly = yes\n")
    with running_wrapper(tmp_path, "--imgfile", str(a), "--config-dir", str(conf)) as w:
        listing = json.loads(run("nbdinfo", "--list", "--json", w.uri("")))
        assert w.export_servers() == [], "listing starts no export server"
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {str(a), "described"}
    assert exports["described"]["description"] == "the b disk"
    assert exports["described"]["export-size"] == 8 * MiB
    assert exports["described"]["is_read_only"] is True
    assert exports[str(a)]["export-size"] == 4 * MiB
    assert exports[str(a)]["is_read_only"] is False


def test_unknown_export_is_refused_with_err_unknown(tmp_path: Path) -> None:
    need("nbdinfo")
    a = image(tmp_path / "a.img")
    with running_wrapper(tmp_path, "--imgfile", str(a)) as w:
        done = subprocess.run(
            ["nbdinfo", w.uri("nope")], capture_output=True, text=True, timeout=30
        )
    assert done.returncode != 0
    # libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT
    assert "No such file or directory for export: nope" in done.stderr


def test_qemu_img_on_two_exports_at_once(tmp_path: Path) -> None:
    need("qemu-img")
    a = image(tmp_path / "a.img", 16 * MiB)
    b = image(tmp_path / "b.img", 16 * MiB)
    src_a = image(tmp_path / "src-a.raw", 16 * MiB, fill=b"A" * 4096)
    src_b = image(tmp_path / "src-b.raw", 16 * MiB, fill=os.urandom(4096))
    with running_wrapper(tmp_path, "--imgfile", str(a), "--imgfile", str(b)) as w:
        jobs = [
            subprocess.Popen(
                ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), w.uri(str(dst))],
                stderr=subprocess.PIPE,
                text=True,
            )
            for src, dst in ((src_a, a), (src_b, b))
        ]
        for job in jobs:
            _out, err = job.communicate(timeout=120)
            assert job.returncode == 0, err
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src_a), w.uri(str(a)))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src_b), w.uri(str(b)))
        assert len(w.export_servers()) == 2, "one server per export"
    assert a.read_bytes() == src_a.read_bytes()
    assert b.read_bytes() == src_b.read_bytes()


def test_two_clients_of_one_export_share_one_server(tmp_path: Path) -> None:
    nbd = import_nbd()
    disk = image(tmp_path / "disk.img")
    with running_wrapper(tmp_path, "--imgfile", str(disk)) as w:
        first, second = nbd.NBD(), nbd.NBD()
        for h in (first, second):
            h.set_export_name(str(disk))
            h.add_meta_context("base:allocation")
            h.connect_uri(w.uri(str(disk)))
        servers = w.export_servers()
        assert len(servers) == 1, servers
        # What the wrapper negotiated holds in the export's server: structured replies, DF,
        # and the metadata context it assigned.
        for h in (first, second):
            assert h.get_structured_replies_negotiated()
            assert h.can_df() and h.can_meta_context("base:allocation")
        first.pwrite(b"shared!!" * 512, 8192)
        first.flush()
        assert second.pread(4096, 8192) == b"shared!!" * 512
        extents: list[tuple[int, int]] = []

        def collect(meta: str, offset: int, entries: list[int], err: object) -> int:
            extents.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        second.block_status(1 * MiB, 0, collect)
        assert extents and sum(length for length, _ in extents) > 0
        for h in (first, second):
            h.shutdown()
        assert w.export_servers() == servers, "the server stays for the next client"


def test_add_and_remove_at_run_time(tmp_path: Path) -> None:
    need("nbdinfo")
    disk = image(tmp_path / "disk.img", 2 * MiB)
    with running_wrapper(tmp_path) as w:
        assert w.ctl("--list") == (0, "no item\n")
        assert w.ctl("--add-target", "late", str(disk))[0] == 0
        code, out = w.ctl("--add-target", "late", str(disk))
        assert (code, out) == (1, "export 'late' already exists\n")
        code, out = w.ctl("--add-target", "ghost", str(tmp_path / "missing.img"))
        assert code == 1 and "No such file or directory" in out
        code, out = w.ctl("--add-target", "bad\x01name", str(disk))
        assert code == 1 and "control characters" in out
        assert w.ctl("--list") == (0, f"1 : late  ({disk})\n")
        info = json.loads(run("nbdinfo", "--json", w.uri("late")))
        assert info["exports"][0]["export-size"] == 2 * MiB
        ((pid, _),) = w.export_servers()
        assert w.ctl("--remove-by-exportname", "late")[0] == 0
        assert not alive(pid), "removing an export stops its server"
        done = subprocess.run(
            ["nbdinfo", w.uri("late")], capture_output=True, text=True, timeout=30
        )
        assert done.returncode != 0 and "No such file or directory" in done.stderr
        assert w.ctl("--remove-by-exportname", "late") == (1, "no export matches 'late'\n")
        assert w.ctl("--add-target", "again", str(disk))[0] == 0
        assert w.ctl("--remove-by-file", str(disk))[0] == 0
        assert w.ctl("--list") == (0, "no item\n")


def test_database_survives_a_restart(tmp_path: Path) -> None:
    need("nbdinfo")
    disk = image(tmp_path / "disk.img", 3 * MiB)
    static = image(tmp_path / "static.img", 1 * MiB)
    with running_wrapper(tmp_path, "--imgfile", str(static)) as w:
        assert w.ctl("--add-target", "kept", str(disk))[0] == 0
        db = json.loads(w.db.read_text())
    assert db == {"version": 2, "images": {"kept": {"image_path": str(disk), "mode": "target"}}}
    assert oct(w.db.stat().st_mode & 0o777) == "0o600"
    with running_wrapper(tmp_path) as w:
        assert w.ctl("--list") == (0, f"1 : kept  ({disk})\n")
        info = json.loads(run("nbdinfo", "--json", w.uri("kept")))
        assert info["exports"][0]["export-size"] == 3 * MiB
    assert not (tmp_path / "state" / "xnbd.state.prev").exists()


def test_corrupt_database_refuses_start_and_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "state" / "xnbd.state"
    db.parent.mkdir()
    db.write_text('{"version": 2, "images": {"x": {"mode": "target"}}')
    done = start_wrapper(tmp_path)
    assert done.returncode == 1
    assert "not valid JSON" in done.stderr and done.stderr.count("\n") == 1
    assert db.read_text() == '{"version": 2, "images": {"x": {"mode": "target"}}'


def test_a_crashed_export_leaves_the_others_serving(tmp_path: Path) -> None:
    nbd = import_nbd()
    a = image(tmp_path / "a.img", fill=b"a")
    b = image(tmp_path / "b.img", fill=b"b")
    with running_wrapper(tmp_path, "--imgfile", str(a), "--imgfile", str(b)) as w:
        ha, hb = nbd.NBD(), nbd.NBD()
        ha.connect_uri(w.uri(str(a)))
        hb.connect_uri(w.uri(str(b)))
        ((pid_a, _),) = [
            s for s in w.export_servers() if s[1].split() and s[1].split()[-1] == str(a)
        ]
        os.kill(pid_a, signal.SIGKILL)
        with pytest.raises(nbd.Error):
            ha.pread(512, 0)
        assert hb.pread(4, 0) == b"bbbb", "the other export keeps serving"
        again = nbd.NBD()
        again.connect_uri(w.uri(str(a)))
        assert again.pread(4, 0) == b"aaaa", "restarted on next use"
        assert pid_a not in [pid for pid, _ in w.export_servers()]
        hb.shutdown()
        again.shutdown()
    assert "signal SIGKILL" in w.log()


def test_control_socket_is_private(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="xnbd-wrapper-test-"))
    public.chmod(0o755)  # the directory lets others reach the socket; the socket must not
    with running_wrapper(tmp_path, control=public / "ctl") as w:
        assert oct(w.control.stat().st_mode & 0o777) == "0o600"
        os.chmod(w.control, 0o666)  # even when opened up, SO_PEERCRED still refuses others
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(w.control))
                    answer = s.recv(100)
                os._exit(0 if answer == b"permission denied\n" else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert w.ctl("--list") == (0, "no item\n"), "root still gets in"
    public.rmdir()


def test_ctl_exit_status_and_shutdown(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img")
    with running_wrapper(tmp_path, "--imgfile", str(disk)) as w:
        code, out = w.ctl("--bgctl-query", str(disk))
        assert code == 1 and "is not a proxy export" in out
        assert w.ctl("--save") == (0, f'Database written to file "{w.db}".\n')
        code, _ = w.ctl("--shutdown")
        assert code == 0
        assert w.proc.wait(20) == 0
    assert not w.control.exists(), "the control socket goes with the wrapper"


def test_without_handoff_each_connection_gets_its_own_server(tmp_path: Path) -> None:
    need("nbdinfo")
    disk = image(tmp_path / "disk.img", fill=b"z")
    with running_wrapper(tmp_path, "--imgfile", str(disk), "--no-handoff") as w:
        info = json.loads(run("nbdinfo", "--json", w.uri(str(disk))))
        assert info["structured"] is False, "--connected-fd serves simple replies only"
        assert info["exports"][0]["export-size"] == 8 * MiB
        out = run("nbdcopy", w.uri(str(disk)), "-") if shutil.which("nbdcopy") else None
        assert out is None or set(out) == {"z"}


@pytest.mark.parametrize("by_name", [True, False], ids=["fd-name", "socket-path"])
def test_under_systemd_socket_activate(tmp_path: Path, by_name: bool) -> None:
    """The control socket is found by its fd name, or (as xnbd-wrapper.socket does it) by being
    the unix socket at the --socket path."""
    need("systemd-socket-activate")
    need("nbdinfo")
    disk = image(tmp_path / "disk.img", 5 * MiB)
    port = free_port()
    control = tmp_path / "activated.ctl"
    args = wrapper_args(
        tmp_path, port, "--imgfile", str(disk), control=None if by_name else control
    )
    names = ["--fdname=nbd:control"] if by_name else []
    env = server_env()
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "-l",
            str(control),
            *names,
            "-E",
            f"PYTHONPATH={env['PYTHONPATH']}",
            "--",
            *WRAPPER,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        listing: dict[str, Any] | None = None
        while listing is None:
            done = subprocess.run(
                ["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}/"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0:
                listing = json.loads(done.stdout)
            else:
                assert time.monotonic() < deadline, done.stderr
                time.sleep(0.1)
        assert [e["export-name"] for e in listing["exports"]] == [str(disk)]
        ctl = subprocess.run(
            [
                *WRAPPER[:2],
                "import sys; from xnbdd.cli.wrapper_ctl import main; sys.exit(main())",
                "--socket",
                str(control),
                "--list",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert (ctl.returncode, ctl.stdout) == (0, f"1 : {disk}  ({disk})\n"), ctl.stderr
        assert not (tmp_path / "ctl").exists(), "the inherited control socket is used instead"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_orphan_leaves_servers_and_the_next_wrapper_adopts_them(tmp_path: Path) -> None:
    nbd = import_nbd()
    disk = image(tmp_path / "disk.img", fill=b"o")
    port = free_port()
    with running_wrapper(tmp_path, "--imgfile", str(disk), port=port) as w:
        client = nbd.NBD()
        client.connect_uri(w.uri(str(disk)))
        ((pid, _),) = w.export_servers()
        assert w.ctl("--orphan")[0] == 0
        assert w.proc.wait(20) == 0
    assert alive(pid), "orphan leaves the export server running"
    assert client.pread(4, 0) == b"oooo", "and its clients connected"
    with running_wrapper(tmp_path, "--imgfile", str(disk), port=port) as w:
        again = nbd.NBD()
        again.connect_uri(w.uri(str(disk)))
        assert again.pread(4, 4096) == b"oooo"
        again.shutdown()
        client.shutdown()
        assert f"adopting running server (pid {pid})" in w.log()
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, "the adopting wrapper stops it at shutdown"
        time.sleep(0.05)


def test_two_clients_of_one_proxy_export_share_one_cache(tmp_path: Path) -> None:
    """docs/decisions.md D21: the original gave each client its own proxy (the second one
    died); here both clients and bgctl talk to one proxy server with one cache."""
    nbd = import_nbd()
    from tests.serverproc import running_server

    origin_image = image(tmp_path / "origin.img", 4 * MiB, fill=os.urandom(4096))
    cache = image(tmp_path / "vm.cache", 0)
    with (
        running_server("--target", str(origin_image), "--readonly", tmp_path=tmp_path) as origin,
        running_wrapper(tmp_path) as w,
    ):
        code, out = w.ctl(
            "--add-proxy",
            "vm",
            "127.0.0.1",
            str(origin.port),
            str(cache),
            str(tmp_path / "vm.bitmap"),
            str(tmp_path / "vm.ctl"),
        )
        assert code == 0, out
        first, second = nbd.NBD(), nbd.NBD()
        first.connect_uri(w.uri("vm"))
        second.connect_uri(w.uri("vm"))
        assert len(w.export_servers()) == 1, "one proxy for both clients"
        expected = origin_image.read_bytes()
        assert first.pread(64 * 1024, 0) == expected[: 64 * 1024]
        assert second.pread(64 * 1024, 1 * MiB) == expected[MiB : MiB + 64 * 1024]
        code, out = w.ctl("--bgctl-query", "vm")
        assert code == 0, out
        assert "cached blocks 32 / 1024" in out, out  # both clients' reads, in one cache
        code, out = w.ctl("--bgctl-cache-all", "vm")
        assert code == 0, out
        assert "cached blocks 1024 / 1024" in w.ctl("--bgctl-query", "vm")[1]
        first.shutdown()
        second.shutdown()
    assert cache.read_bytes() == origin_image.read_bytes()


def test_systemd_units_needs_systemd_and_the_handoff(tmp_path: Path) -> None:
    done = start_wrapper(tmp_path, "--systemd-units", "--no-handoff")
    assert done.returncode == 2 and "--systemd-units needs the hand-off" in done.stderr
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd is PID 1 here: the refusal below cannot happen")
    done = start_wrapper(tmp_path, "--systemd-units")
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.strip()
        == "xnbd-wrapper: --systemd-units: systemd is not running on this machine"
    )


def test_tls_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The front end hands the client's socket to an export server after the handshake; a TLS
    session cannot go with it (docs/wrapper.md), so TLS is refused before anything starts."""
    for mode in ("on", "require"):
        done = start_wrapper(tmp_path, f"--tls={mode}")
        assert done.returncode == 2
        assert "--tls: not offered" in done.stderr and len(done.stderr.splitlines()) == 1
