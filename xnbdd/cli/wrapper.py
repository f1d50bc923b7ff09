"""``xnbd-wrapper``: many exports behind one NBD port (the original's options, plus systemd-era
ones). Argument parsing, start-up checks and exit codes only: 0 after a clean stop, 1 when
start-up fails (one line on stderr), 2 for usage errors."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import socket
import sys

import trio

from .. import __version__, logs
from ..allocator import limit_arenas
from ..fdlimit import raise_open_files_limit
from ..listeners import bind_tcp, bind_unix
from ..proto.consts import DEFAULT_PORT
from ..signals import catch_sigterm_outside_the_receiver, ignore_sigterm_after_the_run
from ..systemd import SystemdEnvError, inherited_sockets
from ..wrapper.registry import (
    DEFAULT_DB,
    Database,
    DatabaseError,
    ExportEntry,
    Registry,
    RegistryError,
    apply_switches,
    load_config_dir,
    restore,
)
from ..wrapper.server import Wrapper, WrapperOptions, WrapperSockets
from ..wrapper.supervisor import ServerSettings, Supervisor
from ..wrapper.units import EXPORTS_DIR as UNITS_DIR
from .common import (
    CONTROL_FD_NAME,
    OneLineParser,
    UsageError,
    describe_error,
    detach,
    first_failure,
    under_systemd,
)
from .server import port

PROG = "xnbd-wrapper"
DEFAULT_CONTROL = "/var/run/xnbd-wrapper.ctl"
DEFAULT_RUN_DIR = "/run/xnbd-wrapper"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Serve many NBD exports on one port; each export runs in its own "
        "xnbd-server, shared by all of its clients.",
    )
    exp = p.add_argument_group("exports")
    exp.add_argument(
        "-f",
        "--imgfile",
        action="append",
        default=[],
        metavar="PATH",
        help="serve PATH as a target export named PATH (repeatable)",
    )
    exp.add_argument(
        "--config-dir",
        metavar="DIR",
        help="one export per DIR/NAME.conf (xnbd-server's configuration format)",
    )
    exp.add_argument(
        "--dbpath",
        default=DEFAULT_DB,
        metavar="PATH",
        help=f"state database of exports added at run time (default {DEFAULT_DB})",
    )
    exp.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="exports added at run time must keep their files inside DIR "
        "(repeatable; default: anywhere)",
    )
    exp.add_argument(
        "--cow",
        action="store_true",
        help="serve target exports copy-on-write (writes go to an overlay)",
    )
    exp.add_argument("--readonly", action="store_true", help="serve every export read-only")

    net = p.add_argument_group("where clients come from")
    net.add_argument(
        "-l",
        "--laddr",
        action="append",
        default=[],
        metavar="ADDR",
        help="address to listen on, repeatable (default: all IPv4 and IPv6)",
    )
    net.add_argument(
        "-p",
        "--lport",
        "--port",
        type=port,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"TCP port (default {DEFAULT_PORT})",
    )
    net.add_argument(
        "-s",
        "--socket",
        default=DEFAULT_CONTROL,
        metavar="PATH",
        help=f"control socket for xnbd-wrapper-ctl (default {DEFAULT_CONTROL})",
    )
    net.add_argument(
        "--tls",
        choices=["off", "on", "require"],
        default="off",
        help="not offered: clients are handed to export servers after the handshake and a TLS "
        "session cannot go with the socket (docs/wrapper.md); use xnbd-server --tls",
    )
    net.add_argument(
        "--handshake-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="disconnect clients that take longer to negotiate (default 30)",
    )

    srv = p.add_argument_group("export servers")
    srv.add_argument(
        "-b",
        "--xnbd-server",
        "--xnbd-binary",
        metavar="CMD",
        help="xnbd-server command (default: xnbd-server from PATH, else this Python's xnbdd)",
    )
    srv.add_argument("--xnbd-bgctl", metavar="CMD", help="xnbd-bgctl command (same default)")
    srv.add_argument(
        "--run-dir",
        metavar="DIR",
        help="hand-off sockets of the export servers (default $RUNTIME_DIRECTORY "
        f"or {DEFAULT_RUN_DIR})",
    )
    srv.add_argument(
        "--no-handoff",
        action="store_true",
        help="as the original: a new server per connection via --connected-fd "
        "(simple replies only; for servers without --handoff-socket)",
    )
    srv.add_argument(
        "--systemd-units",
        action="store_true",
        help="run each export's server as the systemd unit xnbd-export@NAME.service "
        f"(configuration and hand-off socket in {UNITS_DIR}) instead of as a child process",
    )
    srv.add_argument("-Q", "--max-queue-size", metavar="N", help="passed to proxy servers")
    srv.add_argument("-B", "--max-buf-size", metavar="N", help="passed to proxy servers")

    run = p.add_argument_group("running")
    run.add_argument(
        "-d", "--daemonize", action="store_true", help="detach (ignored under systemd)"
    )
    run.add_argument("-L", "--logpath", metavar="FILE", help="append log lines to FILE")
    run.add_argument("-S", "--syslog", action="store_true", help="log to syslog (daemon)")
    run.add_argument("--verbose", action="store_true", help="log debugging details")
    run.add_argument("-v", "--version", action="version", version=f"xnbdd {__version__}")
    return p


def command(text: str | None, program: str, module: str) -> list[str]:
    """A configured command line, or the installed program, or this interpreter's module."""
    if text:
        argv = shlex.split(text)
    elif shutil.which(program):
        argv = [program]
    else:
        argv = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]
    if not argv or not shutil.which(argv[0]):
        raise FileNotFoundError(f"{program}: command not found: {text!r}")
    return argv


def build_registry(ns: argparse.Namespace) -> tuple[Registry, list[str]]:
    db = Database(ns.dbpath) if ns.dbpath else None
    registry = Registry(db, allowed_dirs=ns.allow_dir)
    warnings: list[str] = []

    def add_static(entry: ExportEntry) -> None:
        registry.add(apply_switches(entry, cow=ns.cow, readonly=ns.readonly), save=False)

    for path in ns.imgfile:
        add_static(
            ExportEntry(name=path, mode="target", image=os.path.abspath(path), persistent=False)
        )
    if ns.config_dir:
        entries, notes = load_config_dir(ns.config_dir)
        warnings += notes
        for entry in entries:
            add_static(entry)
    if db is not None:
        warnings += restore(registry, db.load(), cow=ns.cow, readonly=ns.readonly)
    return registry, warnings


def bind_sockets(ns: argparse.Namespace) -> tuple[WrapperSockets, str | None]:
    """Sockets from systemd, else bound here. The inherited control socket is the one named
    "control" (FileDescriptorName=) or the unix socket at the ``--socket`` path."""
    sockets = WrapperSockets()
    wanted_control = os.path.abspath(ns.socket)
    for inherited in inherited_sockets():
        if not inherited.listening:
            raise SystemdEnvError("xnbd-wrapper needs listening sockets (Accept=no)")
        is_control_path = (
            inherited.sock.family == socket.AF_UNIX
            and inherited.sock.getsockname() == wanted_control
        )
        if inherited.name == CONTROL_FD_NAME or is_control_path:
            sockets.control.append(inherited.sock)
        else:
            sockets.nbd.append(inherited.sock)
    control_path = None
    if not sockets.control:
        control_path = os.path.abspath(ns.socket)
        sockets.control.append(bind_unix(control_path, mode=0o600))
    if not sockets.nbd:
        sockets.nbd = bind_tcp(ns.laddr, ns.lport)
    return sockets, control_path


def main(argv: list[str] | None = None) -> int:
    limit_arenas()  # before any thread: connection threads must not each get an arena
    raise_open_files_limit()  # systemd's soft 1024 is too few for many clients
    try:
        ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"{PROG}: {err} (see --help)", file=sys.stderr)
        return 2
    if ns.tls != "off":
        print(
            f"{PROG}: --tls: not offered, the TLS session could not follow the client to its "
            "export server (docs/wrapper.md); serve TLS exports with xnbd-server --tls",
            file=sys.stderr,
        )
        return 2
    if ns.systemd_units and ns.no_handoff:
        print(f"{PROG}: --systemd-units needs the hand-off (see --help)", file=sys.stderr)
        return 2
    if ns.systemd_units and not os.path.isdir("/run/systemd/system"):
        print(f"{PROG}: --systemd-units: systemd is not running on this machine", file=sys.stderr)
        return 1
    try:
        logs.setup_logging(
            logpath=os.path.abspath(ns.logpath) if ns.logpath else None,
            syslog=ns.syslog or (ns.daemonize and not ns.logpath),
            identifier=PROG,
            verbose=ns.verbose,
        )
        run_dir = os.path.abspath(
            ns.run_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_RUN_DIR
        )
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        if ns.systemd_units:
            os.makedirs(UNITS_DIR, mode=0o700, exist_ok=True)
        settings = ServerSettings(
            command=command(ns.xnbd_server, "xnbd-server", "xnbdd.cli.server"),
            run_dir=run_dir,
            syslog=ns.syslog,
            logpath=os.path.abspath(ns.logpath) if ns.logpath else None,
            max_queue_size=ns.max_queue_size,
            max_buf_size=ns.max_buf_size,
            verbose=ns.verbose,
            systemd_units=ns.systemd_units,
        )
        opts = WrapperOptions(
            bgctl_command=command(ns.xnbd_bgctl, "xnbd-bgctl", "xnbdd.cli.bgctl"),
            cow=ns.cow,
            readonly=ns.readonly,
            handoff=not ns.no_handoff,
            handshake_timeout=ns.handshake_timeout,
        )
        registry, warnings = build_registry(ns)
        for warning in warnings:
            logging.getLogger("xnbdd").warning("%s", warning)
        sockets, opts.control_path = bind_sockets(ns)
        if ns.daemonize and not under_systemd():
            detach()
        catch_sigterm_outside_the_receiver()
        try:
            trio.run(Wrapper(opts, registry, Supervisor(settings)).run, sockets)
        finally:
            ignore_sigterm_after_the_run()
    except KeyboardInterrupt:
        return 130
    except (RegistryError, DatabaseError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except BaseException as err:
        failure = first_failure(err)
        if failure is None:
            raise
        print(f"{PROG}: {describe_error(failure)}", file=sys.stderr)
        return 1
    return 0
