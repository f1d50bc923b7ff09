"""``xnbd-wrapper-ctl``: one command to a running xnbd-wrapper over its control socket.

The original's options and exit status (docs/compat.md §1.4): the output of the command is
printed, and the exit status is the wrapper's ``return code`` (outside 0..255: 1; no return code
at all: 1). File arguments are made absolute here, since the wrapper does not share our working
directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from urllib.parse import quote

from .common import OneLineParser, UsageError

PROG = "xnbd-wrapper-ctl"
DEFAULT_SOCKET = "/var/run/xnbd-wrapper.ctl"
PROMPT = b"(xnbd) "
TIMEOUT = 600.0  # bgctl-cache-all may take long; a dead wrapper still ends the wait (EOF)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Control a running xnbd-wrapper.")
    p.add_argument(
        "-s",
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"the wrapper's control socket (default {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--target-exportname",
        metavar="NAME",
        help="with --add-proxy / --bgctl-reconnect: the remote export name",
    )
    cmd = p.add_mutually_exclusive_group(required=True)
    cmd.add_argument("-l", "--list", action="store_true", help="list exports")
    cmd.add_argument("--add-target", nargs=2, metavar=("NAME", "FILE"), help="add a target export")
    cmd.add_argument(
        "--add-proxy",
        nargs=6,
        metavar=("NAME", "HOST", "PORT", "CACHE", "BITMAP", "CTL"),
        help="add a proxy export",
    )
    cmd.add_argument("--remove-by-file", metavar="FILE", help="remove the exports of FILE")
    cmd.add_argument("--remove-by-exportname", metavar="NAME", help="remove export NAME")
    cmd.add_argument(
        "-d", "--shutdown", action="store_true", help="stop every export and the wrapper"
    )
    cmd.add_argument(
        "--orphan", action="store_true", help="stop the wrapper, leave the export servers running"
    )
    cmd.add_argument("--save", action="store_true", help="write the state database now")
    cmd.add_argument("--bgctl-query", metavar="NAME", help="status of proxy export NAME")
    cmd.add_argument("--bgctl-switch", metavar="NAME", help="switch proxy export NAME to target")
    cmd.add_argument("--bgctl-cache-all", metavar="NAME", help="cache all of proxy export NAME")
    cmd.add_argument(
        "--bgctl-reconnect",
        nargs=3,
        metavar=("NAME", "HOST", "PORT"),
        help="connect proxy export NAME to another upstream",
    )
    cmd.add_argument("-a", "--add", metavar="FILE", help=argparse.SUPPRESS)  # deprecated
    cmd.add_argument("-r", "--remove", metavar="INDEX", help=argparse.SUPPRESS)  # deprecated
    return p


def command_words(ns: argparse.Namespace) -> list[str]:
    absolute = os.path.abspath
    remote = [ns.target_exportname] if ns.target_exportname else []
    if ns.list:
        return ["list"]
    if ns.add_target:
        return ["add-target", ns.add_target[0], absolute(ns.add_target[1])]
    if ns.add_proxy:
        name, host, port, cache, bitmap, ctl = ns.add_proxy
        return [
            "add-proxy",
            name,
            host,
            port,
            absolute(cache),
            absolute(bitmap),
            absolute(ctl),
            *remote,
        ]
    if ns.remove_by_file:
        return ["del-file", absolute(ns.remove_by_file)]
    if ns.remove_by_exportname:
        return ["del-exportname", ns.remove_by_exportname]
    if ns.shutdown:
        return ["shutdown"]
    if ns.orphan:
        return ["orphan"]
    if ns.save:
        return ["save"]
    for option in ("bgctl_query", "bgctl_switch", "bgctl_cache_all"):
        if getattr(ns, option):
            return [option.replace("_", "-"), getattr(ns, option)]
    if ns.bgctl_reconnect:
        return ["bgctl-reconnect", *ns.bgctl_reconnect, *remote]
    if ns.add:
        return ["add", absolute(ns.add)]
    return ["del", ns.remove]


def encode_line(words: list[str]) -> bytes:
    head, *args = words
    # Every argument percent-encoded, so spaces and line breaks in names survive the framing.
    return (" ".join([head, *(quote(a, safe="/:@+,=~") for a in args)]) + "\n").encode()


def read_until_prompt(conn: socket.socket) -> tuple[bytes, bool]:
    """Everything up to the next prompt (prompt removed); False when the wrapper hung up."""
    data = b""
    while not data.endswith(PROMPT):
        chunk = conn.recv(65536)
        if not chunk:
            return data, False
        data += chunk
    return data[: -len(PROMPT)], True


def split_return_code(output: str) -> tuple[str, int]:
    lines = output.splitlines(keepends=True)
    if lines and lines[-1].startswith("return code "):
        try:
            code = int(lines[-1].removeprefix("return code ").strip())
        except ValueError:
            return output, 1
        return "".join(lines[:-1]), code if 0 <= code <= 255 else 1
    return output, 1


def run(path: str, words: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(path)
        greeting, alive = read_until_prompt(conn)
        if not alive:
            sys.stdout.write(greeting.decode("utf-8", "replace"))
            return 1
        conn.sendall(encode_line(words))
        raw, alive = read_until_prompt(conn)
        output, code = split_return_code(raw.decode("utf-8", "replace"))
        sys.stdout.write(output)
        if alive:
            with contextlib.suppress(OSError):
                conn.sendall(b"quit\n")
        return code


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"{PROG}: {err} (see --help)", file=sys.stderr)
        return 2
    try:
        return run(ns.socket, command_words(ns))
    except OSError as err:
        print(f"{PROG}: {ns.socket}: {err.strerror or err}", file=sys.stderr)
        return 1
