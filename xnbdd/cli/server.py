"""``xnbd-server``: the original's command line, plus the systemd-era options.

Argument parsing and exit codes only: 0 after a clean stop, 1 when start-up fails (one line on
stderr, never a traceback), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import trio

from .. import __version__, logs
from ..allocator import limit_arenas
from ..config import ConfigError, load_config, parse_size
from ..daemon import ClientSources, Daemon, ServerOptions
from ..fdstore import take_stored
from ..listeners import bind_tcp, bind_unix
from ..proto.consts import DEFAULT_PORT
from ..proto.handshake import TLSPolicy
from ..signals import catch_sigterm_outside_the_receiver, ignore_sigterm_after_the_run
from ..systemd import SystemdEnvError, adopt_sockets, inherited_fds
from ..tls import ClientTLSOptions, ServerTLSOptions
from .common import (
    CONTROL_FD_NAME,
    OneLineParser,
    UsageError,
    describe_error,
    detach,
    first_failure,
    under_systemd,
)

PROG = "xnbd-server"
USAGE = f"""\
{PROG} --target     [options] IMAGE
       {PROG} --cow-target [options] BASE_IMAGE
       {PROG} --proxy      [options] REMOTE_HOST REMOTE_PORT CACHE_IMAGE CACHE_BITMAP CONTROL_SOCKET
       {PROG} --help | --version"""
POSITIONALS = {
    "target": ["image"],
    "cow_target": ["image"],
    "proxy": ["remote_host", "remote_port", "image", "cache_bitmap", "control_socket"],
}
# Defaults applied after the configuration file, so that "not given" can be told from "default".
DEFAULTS: dict[str, object] = {
    "lport": DEFAULT_PORT,
    "laddr": [],
    "readonly": False,
    "oldstyle": False,
    "syslog": False,
    "daemonize": False,
    "clear_bitmap": False,
    "max_queue_size": 0,
    "max_buf_size": 0,
    "max_clients": 0,
    "handshake_timeout": 30.0,
    "remote_timeout": 30.0,
    "description": "",
    "verbose": False,
    "tls": "off",
    "tls_verify_peer": False,
    "remote_tls": False,
}


def number(text: str) -> int:
    """Integers with base auto-detection (0x.., 0o..), as the original accepts."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def byte_size(text: str) -> int:
    """Bytes, with an optional binary suffix (``8M``)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}: {text!r}") from None


def port(text: str) -> int:
    value = number(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        usage=USAGE,
        description="Serve a disk image over NBD (target, copy-on-write target, or caching proxy).",
        argument_default=argparse.SUPPRESS,
    )
    modes = p.add_argument_group("modes (exactly one)").add_mutually_exclusive_group()
    modes.add_argument(
        "-t",
        "--target",
        dest="mode",
        action="store_const",
        const="target",
        help="serve IMAGE (a file or a block device)",
    )
    modes.add_argument(
        "-c",
        "--cow-target",
        dest="mode",
        action="store_const",
        const="cow_target",
        help="serve BASE_IMAGE; writes go to a temporary overlay",
    )
    modes.add_argument(
        "-p",
        "--proxy",
        dest="mode",
        action="store_const",
        const="proxy",
        help="serve a remote NBD export, caching blocks in CACHE_IMAGE",
    )
    p.add_argument("args", nargs="*", metavar="ARG", help=argparse.SUPPRESS)

    net = p.add_argument_group("where clients come from")
    net.add_argument(
        "-l",
        "--lport",
        type=port,
        metavar="PORT",
        help=f"TCP port to listen on (default {DEFAULT_PORT})",
    )
    net.add_argument(
        "--laddr",
        action="append",
        metavar="ADDR",
        help="address to listen on, repeatable (default: all IPv4 and IPv6)",
    )
    net.add_argument("--unix", metavar="PATH", help="also listen on a unix socket")
    net.add_argument(
        "-i",
        "--inetd",
        action="store_true",
        help="the one client is on standard input (inetd, Accept=yes)",
    )
    net.add_argument(
        "-F",
        "--connected-fd",
        type=number,
        metavar="N",
        help="fd N is a client whose handshake is already done",
    )
    net.add_argument(
        "--handoff-socket",
        metavar="PATH",
        help="take clients negotiated by xnbd-wrapper from this unix socket "
        "(instead of listening on TCP)",
    )
    net.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="SECONDS",
        help="disconnect clients that take longer to negotiate (default 30)",
    )
    net.add_argument(
        "--oldstyle",
        action="store_true",
        help="speak the 2008 oldstyle handshake (for old xNBD tools)",
    )

    tls = p.add_argument_group("TLS (docs/tls.md)")
    tls.add_argument(
        "--tls",
        choices=["off", "on", "require"],
        help="NBD_OPT_STARTTLS: off (default), on (clients may upgrade), require (nothing "
        "but STARTTLS before TLS)",
    )
    tls.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="ca-cert.pem, server-cert.pem, server-key.pem (default with --tls: systemd's "
        "$CREDENTIALS_DIRECTORY)",
    )
    tls.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="clients must present a certificate signed by ca-cert.pem",
    )
    tls.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="pre-shared keys (psktool format) instead of certificates; needs Python 3.13+",
    )

    exp = p.add_argument_group("the export")
    exp.add_argument("-r", "--readonly", action="store_true", help="export read-only")
    exp.add_argument(
        "--exportname", metavar="NAME", help="answer only to this export name (default: any name)"
    )
    exp.add_argument("--description", metavar="TEXT", help="export description for clients")
    exp.add_argument(
        "--cow-dir",
        metavar="DIR",
        help="cow-target: put the overlay files in DIR (default: beside the base)",
    )
    exp.add_argument(
        "-Q",
        "--max-queue-size",
        type=number,
        metavar="N",
        help="requests in flight per connection (0: default 256)",
    )
    exp.add_argument(
        "-B",
        "--max-buf-size",
        type=byte_size,
        metavar="BYTES",
        help="bytes of request data the whole server holds, a quarter of it at most per "
        "connection (suffixes K, M, G; 0: default 256M)",
    )

    exp.add_argument(
        "--max-clients",
        type=number,
        metavar="N",
        help="refuse clients past N connections at once, with a message during the handshake "
        "(0: no limit, the default)",
    )

    prx = p.add_argument_group("proxy mode")
    prx.add_argument(
        "--target-exportname", metavar="NAME", help="export name to ask the remote server for"
    )
    prx.add_argument(
        "--clear-bitmap", action="store_true", help="forget what is cached and start over"
    )
    prx.add_argument(
        "--remote-timeout",
        type=float,
        metavar="SECONDS",
        help="fail a request with EIO when the remote has not answered it after "
        "SECONDS, reconnecting meanwhile (default 30)",
    )
    prx.add_argument(
        "--remote-tls",
        action="store_true",
        help="speak TLS (STARTTLS) to the remote server, verifying its certificate",
    )
    prx.add_argument(
        "--remote-tls-ca",
        metavar="FILE",
        help="CA certificate that signed the remote's (default: the system's CAs)",
    )
    prx.add_argument(
        "--remote-tls-cert", metavar="FILE", help="client certificate to show the remote"
    )
    prx.add_argument("--remote-tls-key", metavar="FILE", help="its private key")

    run = p.add_argument_group("running")
    run.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control socket for xnbd-bgctl (target modes; proxy mode takes it as CONTROL_SOCKET)",
    )
    run.add_argument(
        "--config", metavar="FILE", help="read settings from FILE (command-line options win)"
    )
    run.add_argument("-L", "--logpath", metavar="FILE", help="append log lines to FILE")
    run.add_argument("-S", "--syslog", action="store_true", help="log to syslog (daemon)")
    run.add_argument(
        "-d", "--daemonize", action="store_true", help="detach (ignored under systemd)"
    )
    run.add_argument("--verbose", action="store_true", help="log debugging details")
    run.add_argument("-v", "--version", action="version", version=f"xnbdd {__version__}")
    return p


def parse(argv: list[str]) -> dict[str, object]:
    """Command line + configuration file -> one settings dict (raises UsageError/ConfigError)."""
    ns = vars(build_parser().parse_args(argv))
    config_path = ns.pop("config", None)
    settings: dict[str, object] = {}
    if isinstance(config_path, str):
        settings.update(load_config(config_path))
        settings["config"] = os.path.abspath(config_path)
    settings["command_line_keys"] = frozenset(ns)
    args = ns.pop("args", [])
    mode = ns.get("mode", settings.get("mode"))
    if mode is None:
        raise UsageError("choose a mode: --target, --cow-target or --proxy")
    settings.update(ns)
    settings["mode"] = mode
    if mode == "proxy" and "cache_image" in settings:
        settings.setdefault("image", settings.pop("cache_image"))  # config key cache-image
    names = POSITIONALS[str(mode)]
    if args:
        if len(args) != len(names):
            flag = "--" + str(mode).replace("_", "-")
            want = " ".join(n.upper() for n in names)
            raise UsageError(f"{flag} takes {want} ({len(args)} argument(s) given)")
        settings.update(zip(names, args, strict=True))
    missing = [n for n in names if not settings.get(n)]
    if missing:
        raise UsageError(f"missing {' '.join(m.upper() for m in missing)}")
    for key, value in DEFAULTS.items():
        settings.setdefault(key, value)
    if settings.get("inetd") and settings.get("connected_fd") is not None:
        raise UsageError("--inetd and --connected-fd exclude each other")
    if settings.get("inetd") and settings.get("daemonize"):
        raise UsageError("--inetd and --daemonize exclude each other")
    check_tls(settings)
    return settings


def check_tls(settings: dict[str, object]) -> None:
    """The combinations TLS cannot be part of (docs/tls.md)."""
    tls_keys = ("tls_certificates", "tls_psk", "tls_verify_peer")
    if settings["tls"] == "off" and any(settings.get(key) for key in tls_keys):
        raise UsageError("--tls-certificates/-psk/-verify-peer need --tls on or require")
    if settings.get("tls_psk") and (
        settings.get("tls_certificates") or settings.get("tls_verify_peer")
    ):
        raise UsageError("--tls-psk excludes --tls-certificates and --tls-verify-peer")
    if settings["tls"] != "off":
        if settings.get("oldstyle"):
            raise UsageError("--tls: the oldstyle handshake has no STARTTLS")
        if settings.get("connected_fd") is not None:
            raise UsageError("--tls: a --connected-fd client has negotiated already, in the clear")
        if settings.get("handoff_socket"):
            raise UsageError(
                "--tls: clients handed over by xnbd-wrapper negotiated in the clear "
                "(xnbd-wrapper does not offer TLS; see docs/wrapper.md)"
            )
    remote_keys = ("remote_tls_ca", "remote_tls_cert", "remote_tls_key")
    if not settings["remote_tls"] and any(settings.get(key) for key in remote_keys):
        raise UsageError("--remote-tls-ca/-cert/-key need --remote-tls")
    if settings["remote_tls"] and settings["mode"] != "proxy":
        raise UsageError("--remote-tls is for --proxy mode")


def tls_options(settings: dict[str, object]) -> ServerTLSOptions:
    policy = TLSPolicy(str(settings["tls"]))
    certificates = str(settings.get("tls_certificates") or "")
    psk = str(settings.get("tls_psk") or "")
    if policy is not TLSPolicy.OFF and not certificates and not psk:
        # LoadCredential= puts the files there for a sandboxed unit (units/, docs/tls.md).
        certificates = os.environ.get("CREDENTIALS_DIRECTORY", "")
    return ServerTLSOptions(
        mode=policy,
        certificates=os.path.abspath(certificates) if certificates else "",
        verify_peer=bool(settings["tls_verify_peer"]),
        psk_file=os.path.abspath(psk) if psk else "",
    )


def remote_tls_options(settings: dict[str, object]) -> ClientTLSOptions | None:
    if not settings["remote_tls"]:
        return None

    def path(key: str) -> str:
        value = settings.get(key)
        return os.path.abspath(str(value)) if value else ""

    return ClientTLSOptions(
        ca=path("remote_tls_ca"), cert=path("remote_tls_cert"), key=path("remote_tls_key")
    )


def make_options(settings: dict[str, object]) -> ServerOptions:
    def path(key: str) -> str:
        return os.path.abspath(str(settings[key]))  # survives --daemonize: docs/decisions.md D24

    return ServerOptions(
        mode=str(settings["mode"]),
        image=path("image"),
        readonly=bool(settings["readonly"]),
        exportname=settings.get("exportname"),  # type: ignore[arg-type]
        description=str(settings["description"]),
        oldstyle=bool(settings["oldstyle"]),
        max_queue_size=int(settings["max_queue_size"]),  # type: ignore[call-overload]
        max_clients=int(settings["max_clients"]),  # type: ignore[call-overload]
        max_buf_size=int(settings["max_buf_size"]),  # type: ignore[call-overload]
        handshake_timeout=float(settings["handshake_timeout"]),  # type: ignore[arg-type]
        cow_dir=os.path.abspath(str(settings["cow_dir"])) if settings.get("cow_dir") else None,
        remote_host=str(settings.get("remote_host", "")),
        remote_port=str(settings.get("remote_port", "")),
        cache_bitmap=path("cache_bitmap") if settings.get("cache_bitmap") else "",
        control_socket=path("control_socket") if settings.get("control_socket") else "",
        target_exportname=settings.get("target_exportname"),  # type: ignore[arg-type]
        clear_bitmap=bool(settings["clear_bitmap"]),
        remote_timeout=float(settings["remote_timeout"]),  # type: ignore[arg-type]
        tls=tls_options(settings),
        remote_tls=remote_tls_options(settings),
        config=settings.get("config"),  # type: ignore[arg-type]
        command_line_keys=settings["command_line_keys"],  # type: ignore[arg-type]
    )


def client_sources(settings: dict[str, object]) -> ClientSources:
    """Adopt or bind every socket now, so errors are reported before serving starts."""
    if settings.get("inetd"):
        try:
            sock = socket.socket(fileno=os.dup(0))
        except OSError:
            raise OSError("--inetd: standard input is not a socket") from None
        # Keep stray output off the client's connection.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        return ClientSources(connection=sock)
    fd = settings.get("connected_fd")
    if isinstance(fd, int):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise OSError(f"--connected-fd {fd}: not a connected socket") from None
        return ClientSources(negotiated_fd=sock)
    # Clients handed over by the previous process first (fdstore.py), then the sockets.
    handover, fds = take_stored(inherited_fds())
    handoff = settings.get("handoff_socket")
    if isinstance(handoff, str):
        handoff_sock = bind_unix(os.path.abspath(handoff), mode=0o600)
        return ClientSources(handoff=handoff_sock, handover=handover)
    inherited = adopt_sockets(fds)
    # A socket named "control" (FileDescriptorName=control) is xnbd-bgctl's, not a client's.
    control = next((s.sock for s in inherited if s.name == CONTROL_FD_NAME), None)
    inherited = [s for s in inherited if s.name != CONTROL_FD_NAME]
    if inherited:
        connected = [s for s in inherited if not s.listening]
        if connected:
            if len(inherited) > 1:
                raise SystemdEnvError("a connected socket must be the only one passed")
            return ClientSources(connection=connected[0].sock, control=control, handover=handover)
        listening = [s.sock for s in inherited]
        return ClientSources(listeners=listening, control=control, handover=handover)
    laddr = settings["laddr"]
    listeners = bind_tcp(list(laddr) if isinstance(laddr, list) else [], int(settings["lport"]))  # type: ignore[call-overload]
    unix = settings.get("unix")
    if isinstance(unix, str):
        listeners.append(bind_unix(os.path.abspath(unix)))
    return ClientSources(listeners=listeners, control=control, handover=handover)


def main(argv: list[str] | None = None) -> int:
    limit_arenas()  # before any thread: connection threads must not each get an arena
    try:
        settings = parse(sys.argv[1:] if argv is None else argv)
    except (UsageError, ConfigError) as err:
        print(f"{PROG}: {err} (see --help)", file=sys.stderr)
        return 2
    try:
        opts = make_options(settings)
        logpath = settings.get("logpath")
        # As the original: inetd and daemonized runs have no stderr to log to, so syslog.
        implied_syslog = bool(settings.get("inetd") or settings["daemonize"]) and not logpath
        logs.setup_logging(
            logpath=os.path.abspath(str(logpath)) if logpath else None,  # reopened after chdir
            syslog=bool(settings["syslog"]) or implied_syslog,
            identifier=PROG,
            verbose=bool(settings["verbose"]),
        )
        if opts.mode != "proxy" and not os.path.exists(opts.image):
            raise FileNotFoundError(f"{opts.image}: no such file or device")
        sources = client_sources(settings)
        if settings["daemonize"] and not under_systemd():
            detach()
        catch_sigterm_outside_the_receiver()
        try:
            trio.run(Daemon(opts, sources).run)
        finally:
            ignore_sigterm_after_the_run()
    except KeyboardInterrupt:
        return 130
    except BaseException as err:  # start-up errors become one line, not a traceback
        failure = first_failure(err)
        if failure is None:
            raise
        print(f"{PROG}: {describe_error(failure)}", file=sys.stderr)
        return 1
    return 0
