"""``xnbd-server``: the original's command line, plus the systemd-era options.

Argument parsing and exit codes only: 0 after a clean stop, 1 when start-up fails (one line on
stderr, never a traceback), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import trio

from .. import __version__, logs
from ..allocator import limit_arenas
from ..backends.rbd import RbdCluster, RbdSpec, is_rbd
from ..config import Config, ConfigError, Mode, load, parse_size
from ..daemon import ClientSources, Daemon, ServerOptions
from ..fdlimit import raise_open_files_limit
from ..fdstore import take_stored
from ..lifetime import exit_with_parent
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
    Mode.TARGET: ["image"],
    Mode.COW_TARGET: ["image"],
    Mode.PROXY: ["remote_host", "remote_port", "image", "cache_bitmap", "control_socket"],
}


@dataclass(frozen=True)
class Settings(Config):
    """The configuration file's values overlaid by the command line, plus what only the command
    line sets."""

    inetd: bool = False
    connected_fd: int | None = None
    daemonize: bool = False
    exit_with_parent: bool = False
    verbose: bool = False
    config: str | None = None  # the configuration file, absolute: SIGHUP reads it again
    command_line_keys: frozenset[str] = frozenset()  # these keep their values at a reload


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
        const=Mode.TARGET,
        help="serve IMAGE (a file or a block device)",
    )
    modes.add_argument(
        "-c",
        "--cow-target",
        dest="mode",
        action="store_const",
        const=Mode.COW_TARGET,
        help="serve BASE_IMAGE; writes go to a temporary overlay",
    )
    modes.add_argument(
        "-p",
        "--proxy",
        dest="mode",
        action="store_const",
        const=Mode.PROXY,
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
        "--rotational",
        action=argparse.BooleanOptionalAction,
        help="advertise (or with --no-rotational, do not) a rotational disk to clients "
        "(default: as the image's device says in sysfs)",
    )
    exp.add_argument(
        "--max-clients",
        type=number,
        metavar="N",
        help="refuse clients past N connections at once, with a message during the handshake "
        "(0: no limit, the default)",
    )
    exp.add_argument(
        "--workers",
        type=number,
        metavar="N",
        help="serve the connections of a plain file, device or cow-target export in N worker "
        "processes, "
        "so they use N cores; they start once two connections are served at once (0: all in "
        "this process; default: one per CPU the process may use, at most 8, none on one CPU)",
    )
    exp.add_argument(
        "--snapshot-rate",
        type=byte_size,
        metavar="BYTES",
        help="copy a snapshot (SIGUSR1, xnbd-bgctl --snapshot) in the background at most this "
        "fast, per second (suffixes K, M, G; 0: as fast as it goes, the default)",
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

    ceph = p.add_argument_group("Ceph RBD images, IMAGE = rbd:POOL/IMAGE[@SNAP] (docs/rbd.md)")
    ceph.add_argument(
        "--rbd-conf", metavar="FILE", help="the cluster's ceph.conf (default /etc/ceph/ceph.conf)"
    )
    ceph.add_argument(
        "--rbd-id", metavar="NAME", help="Ceph client id, without 'client.' (default admin)"
    )
    ceph.add_argument(
        "--rbd-keyring", metavar="FILE", help="that client's keyring (default: from ceph.conf)"
    )

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
    run.add_argument(
        "--pid-file",
        metavar="PATH",
        help="write the daemon's PID to PATH once it accepts clients; removed when it stops",
    )
    run.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (as on SIGTERM) when the process that started the server exits (Linux)",
    )
    run.add_argument("--verbose", action="store_true", help="log debugging details")
    run.add_argument("-v", "--version", action="version", version=f"xnbdd {__version__}")
    return p


def parse(argv: list[str]) -> Settings:
    """Command line over configuration file -> Settings (raises UsageError/ConfigError)."""
    ns: dict[str, Any] = vars(build_parser().parse_args(argv))
    config_path = ns.pop("config", None)
    base = load(config_path) if isinstance(config_path, str) else Config()
    command_line_keys = frozenset(ns)
    args = ns.pop("args", [])
    mode: Mode | None = ns.pop("mode", base.mode)
    if mode is None:
        raise UsageError("choose a mode: --target, --cow-target or --proxy")
    if "laddr" in ns:
        ns["laddr"] = tuple(ns["laddr"])
    if mode is Mode.PROXY and base.cache_image:  # config key cache-image
        ns.update(image=base.image or base.cache_image, cache_image=None)
    names = POSITIONALS[mode]
    if args:
        if len(args) != len(names):
            want = " ".join(n.upper() for n in names)
            raise UsageError(f"{mode.flag} takes {want} ({len(args)} argument(s) given)")
        ns.update(zip(names, args, strict=True))
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(Config)}
    values.update(
        ns,
        mode=mode,
        config=os.path.abspath(config_path) if isinstance(config_path, str) else None,
        command_line_keys=command_line_keys,
    )
    settings = Settings(**values)
    missing = [n for n in names if not getattr(settings, n)]
    if missing:
        raise UsageError(f"missing {' '.join(m.upper() for m in missing)}")
    if settings.inetd and settings.connected_fd is not None:
        raise UsageError("--inetd and --connected-fd exclude each other")
    if settings.inetd and settings.daemonize:
        raise UsageError("--inetd and --daemonize exclude each other")
    if settings.exit_with_parent and settings.daemonize:
        raise UsageError("--exit-with-parent and --daemonize exclude each other")
    check_tls(settings)
    check_rbd(settings)
    return settings


def check_rbd(settings: Settings) -> None:
    """rbd:POOL/IMAGE[@SNAP] is well formed and used where it is supported (docs/rbd.md)."""
    if not settings.image or not is_rbd(settings.image):
        return
    try:
        spec = RbdSpec.parse(settings.image)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if settings.mode is Mode.COW_TARGET:
        raise UsageError("rbd: images are served by --target or cached into by --proxy")
    if settings.mode is Mode.PROXY and spec.snap:
        raise UsageError(f"{spec}: a snapshot is read-only; a proxy's cache must be writable")


def check_tls(settings: Settings) -> None:
    """The combinations TLS cannot be part of (docs/tls.md)."""
    if settings.tls == "off" and (
        settings.tls_certificates or settings.tls_psk or settings.tls_verify_peer
    ):
        raise UsageError("--tls-certificates/-psk/-verify-peer need --tls on or require")
    if settings.tls_psk and (settings.tls_certificates or settings.tls_verify_peer):
        raise UsageError("--tls-psk excludes --tls-certificates and --tls-verify-peer")
    if settings.tls != "off":
        if settings.oldstyle:
            raise UsageError("--tls: the oldstyle handshake has no STARTTLS")
        if settings.connected_fd is not None:
            raise UsageError("--tls: a --connected-fd client has negotiated already, in the clear")
        if settings.handoff_socket:
            raise UsageError(
                "--tls: clients handed over by xnbd-wrapper negotiated in the clear "
                "(xnbd-wrapper does not offer TLS; see docs/wrapper.md)"
            )
    if not settings.remote_tls and (
        settings.remote_tls_ca or settings.remote_tls_cert or settings.remote_tls_key
    ):
        raise UsageError("--remote-tls-ca/-cert/-key need --remote-tls")
    if settings.remote_tls and settings.mode is not Mode.PROXY:
        raise UsageError("--remote-tls is for --proxy mode")


def absolute(path: str | None) -> str:
    """An absolute path ("" for none): it survives --daemonize (docs/decisions.md D24)."""
    return os.path.abspath(path) if path else ""


def image_name(image: str) -> str:
    """A file's absolute path; an RBD image (rbd:POOL/IMAGE) as given."""
    return image if is_rbd(image) else absolute(image)


def tls_options(settings: Settings) -> ServerTLSOptions:
    policy = TLSPolicy(settings.tls)
    certificates = settings.tls_certificates or ""
    if policy is not TLSPolicy.OFF and not certificates and not settings.tls_psk:
        # LoadCredential= puts the files there for a sandboxed unit (units/, docs/tls.md).
        certificates = os.environ.get("CREDENTIALS_DIRECTORY", "")
    return ServerTLSOptions(
        mode=policy,
        certificates=absolute(certificates),
        verify_peer=settings.tls_verify_peer,
        psk_file=absolute(settings.tls_psk),
    )


def remote_tls_options(settings: Settings) -> ClientTLSOptions | None:
    if not settings.remote_tls:
        return None
    return ClientTLSOptions(
        ca=absolute(settings.remote_tls_ca),
        cert=absolute(settings.remote_tls_cert),
        key=absolute(settings.remote_tls_key),
    )


def make_options(settings: Settings) -> ServerOptions:
    assert settings.mode is not None and settings.image  # parse() checked both
    return ServerOptions(
        mode=settings.mode,
        image=image_name(settings.image),
        readonly=settings.readonly,
        exportname=settings.exportname,
        description=settings.description,
        oldstyle=settings.oldstyle,
        max_queue_size=settings.max_queue_size,
        max_clients=settings.max_clients,
        workers=settings.workers,
        snapshot_rate=settings.snapshot_rate,
        max_buf_size=settings.max_buf_size,
        handshake_timeout=settings.handshake_timeout,
        cow_dir=absolute(settings.cow_dir) or None,
        remote_host=settings.remote_host or "",
        remote_port=str(settings.remote_port or ""),
        cache_bitmap=absolute(settings.cache_bitmap),
        control_socket=absolute(settings.control_socket),
        target_exportname=settings.target_exportname,
        clear_bitmap=settings.clear_bitmap,
        remote_timeout=settings.remote_timeout,
        tls=tls_options(settings),
        remote_tls=remote_tls_options(settings),
        rotational=settings.rotational,
        pid_file=absolute(settings.pid_file),
        config=settings.config,
        command_line_keys=settings.command_line_keys,
        rbd=RbdCluster(
            conf=absolute(settings.rbd_conf) or None,
            client_id=settings.rbd_id,
            keyring=absolute(settings.rbd_keyring) or None,
        ),
    )


def client_sources(settings: Settings) -> ClientSources:
    """Adopt or bind every socket now, so errors are reported before serving starts."""
    if settings.inetd:
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
    fd = settings.connected_fd
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise OSError(f"--connected-fd {fd}: not a connected socket") from None
        return ClientSources(negotiated_fd=sock)
    # Clients handed over by the previous process first (fdstore.py), then the sockets.
    handover, fds = take_stored(inherited_fds())
    if settings.handoff_socket:
        handoff_sock = bind_unix(absolute(settings.handoff_socket), mode=0o600)
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
    listeners = bind_tcp(list(settings.laddr), settings.lport)
    if settings.unix:
        listeners.append(bind_unix(absolute(settings.unix)))
    return ClientSources(listeners=listeners, control=control, handover=handover)


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # before anything can outlive it (--exit-with-parent)
    limit_arenas()  # before any thread: connection threads must not each get an arena
    raise_open_files_limit()  # systemd's soft 1024 is too few for many clients
    try:
        settings = parse(sys.argv[1:] if argv is None else argv)
    except (UsageError, ConfigError) as err:
        print(f"{PROG}: {err} (see --help)", file=sys.stderr)
        return 2
    try:
        opts = make_options(settings)
        logpath = settings.logpath
        # As the original: inetd and daemonized runs have no stderr to log to, so syslog.
        implied_syslog = (settings.inetd or settings.daemonize) and not logpath
        logs.setup_logging(
            logpath=absolute(logpath) or None,  # reopened after chdir
            syslog=settings.syslog or implied_syslog,
            identifier=PROG,
            verbose=settings.verbose,
        )
        if (
            opts.mode is not Mode.PROXY
            and not is_rbd(opts.image)
            and not os.path.exists(opts.image)
        ):
            raise FileNotFoundError(f"{opts.image}: no such file or device")
        sources = client_sources(settings)
        if settings.daemonize and not under_systemd():
            detach()
        catch_sigterm_outside_the_receiver()
        if settings.exit_with_parent:
            exit_with_parent(parent)
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
