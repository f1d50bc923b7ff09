"""xnbd-bgctl: control a running proxy through its control socket (docs/compat.md §1.2, §7).

    xnbd-bgctl [--json] --query CONTROL_SOCKET
    xnbd-bgctl [--force] --switch CONTROL_SOCKET
    xnbd-bgctl [--progress] [--blocks-per-request N] --cache-all CONTROL_SOCKET
    xnbd-bgctl [--exportname NAME] --reconnect CONTROL_SOCKET HOST PORT
    xnbd-bgctl [--json] --snapshot CONTROL_SOCKET

Exit status: 0 success, 1 the daemon refused or failed the command (or usage error), 2 the
control socket could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from xnbdd.control.client import CommandFailed, ControlClient
from xnbdd.control.protocol import ControlError

TYPE_CHECKING = False  # not typing's: importing typing costs xnbd-bgctl's start 2 ms
if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO

BLOCK_SIZE = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message} (see --help)\n")


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, told the terminal's width: finding it alone, argparse imports
    shutil, 2 ms of every start (cache-all's figure counts xnbd-bgctl's start)."""
    return argparse.HelpFormatter(prog, width=_columns() - 2)


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns if columns > 0 else 80


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xnbd-bgctl",
        description="Control an xnbdd proxy.",
        formatter_class=_help_formatter,
    )
    commands = parser.add_mutually_exclusive_group()
    commands.add_argument("-q", "--query", action="store_const", dest="cmd", const="query")
    commands.add_argument("-s", "--switch", action="store_const", dest="cmd", const="switch")
    commands.add_argument(
        "--shutdown", action="store_const", dest="cmd", const="switch", help=argparse.SUPPRESS
    )  # deprecated alias of --switch
    commands.add_argument(
        "-c",
        "--cache-all",
        action="store_const",
        dest="cmd",
        const="cache-all",
        help="fetch every block not cached yet; goes on after a restart of the server",
    )
    commands.add_argument(
        "-C",
        "--cache-all2",
        action="store_const",
        dest="cmd",
        const="cache-all",
        help="same as --cache-all",
    )
    commands.add_argument("-r", "--reconnect", action="store_const", dest="cmd", const="reconnect")
    commands.add_argument(
        "--snapshot",
        action="store_const",
        dest="cmd",
        const="snapshot",
        help="target modes: take a snapshot of the image, wait until it is complete and "
        "durable, print its path",
    )
    parser.add_argument("--force", action="store_true", help="switch even with uncached blocks")
    parser.add_argument("--progress", action="store_true", help="progress bar on a terminal")
    parser.add_argument("--blocks-per-request", type=int, default=None, metavar="N")
    parser.add_argument("--exportname", default=None, metavar="NAME")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("control_socket", metavar="CONTROL_SOCKET")
    parser.add_argument("extra", nargs="*", metavar="HOST PORT")
    return parser


def _percent(part: int, whole: int) -> str:
    """One decimal, rounded down, so 100.0 means really complete (as the original prints)."""
    return f"{math.floor(1000 * part / whole) / 10:.1f}" if whole else "0.0"


def format_query(status: dict[str, Any]) -> str:
    """The original's five lines for a proxy; a server that has switched (or was started in a
    target mode) has no cache, bitmap or origin, so it gets one line naming its image instead."""
    buf, buf_max = int(status.get("buffer_used", 0)), int(status.get("buffer_limit", 0))
    que, que_max = int(status.get("queue_used", 0)), int(status.get("queue_limit", 0))
    usage = [
        f"internal buffer usage: {buf} bytes / {buf_max} bytes "
        f"({100 * buf / buf_max if buf_max else 0.0:.1f}%)",
        f"pending request count: {que} / {que_max} "
        f"({100 * que / que_max if que_max else 0.0:.1f}%)",
    ]
    tls = status.get("tls", "off")
    if tls != "off":  # a line of our own, after the original's
        usage.append(
            f"TLS {tls}: {status.get('tls_clients', 0)} of {status.get('clients', 0)} "
            "clients over TLS"
        )
    usage += format_clients(status.get("connections"))
    mode = status.get("mode", "proxy")
    if mode != "proxy" and "cache_path" not in status:
        head = f"{mode} mode: {status.get('image', '?')}, disksize {status.get('size', 0)}"
        operation = status.get("operation")
        return "\n".join([head, *([operation] if operation else []), *usage])
    cached, total = int(status.get("cached_blocks", 0)), int(status.get("total_blocks", 0))
    remote = status.get("remote", "?")
    state = status.get("remote_state")
    lines = [
        f"{status.get('cache_path', '?')} ({status.get('bitmap_path', '?')}): "
        f"disksize {status.get('size', 0)}",
        f"forwarded to {remote}" + (f" ({state})" if state else ""),
        f"cached blocks {cached} / {total} ({_percent(cached, total)}%)",
        *usage,
    ]
    return "\n".join(lines)


def format_clients(connections: object) -> list[str]:
    """Lines of our own after the original's: who is connected, to which export, since when
    (UTC). A daemon older than this list sends none, and gets no lines."""
    if not isinstance(connections, list):
        return []
    lines = [f"connected clients: {len(connections)}"]
    for c in sorted(connections, key=lambda c: float(c.get("since", 0))):
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(c.get("since", 0))))
        name = c.get("export")
        export = "negotiating" if name is None else f"export {json.dumps(name)}"
        tls = ", TLS" if c.get("tls") else ""
        worker = f", worker process {c['worker']}" if c.get("worker") else ""
        lines.append(f"  {c.get('client') or '?'}: {export}, since {since}{tls}{worker}")
    return lines


class ProgressBar:
    """``\\r 42.0% [#####.....] 118.3 MiB/s, 0:00:12 left`` on a terminal; nothing otherwise."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.start = time.monotonic()
        self.first: int | None = None
        self.shown = False

    def update(self, cached: int, total: int) -> None:
        if self.first is None:
            self.first = cached
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (cached - self.first) / elapsed  # blocks per second fetched by this run
        filled = self.width * cached // total if total else self.width
        left = f"{_clock((total - cached) / rate)} left" if rate > 0 else "--:--:-- left"
        self.out.write(
            f"\r{_percent(cached, total):>5}% [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{rate * BLOCK_SIZE / 2**20:.1f} MiB/s, {left} "
        )
        self.out.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _cache_all(
    client: ControlClient, args: argparse.Namespace, bar: ProgressBar | None
) -> dict[str, Any]:
    """Cache every block. When the server restarts with its clients handed over
    (docs/handover.md) it says so ("restarting") before the control connection ends: then
    connect again as soon as the next process listens and go on -- cache-all fetches only blocks
    not cached yet. A server that ends otherwise (a stop, a crash) is an error, as before; so is
    one that does not come back within RESUME_WAIT seconds."""
    restarting = False
    # After a restart was announced, a connection that ends without an answer is the stopping
    # process going away (its control socket took the connection but will not serve it): the
    # next process is not there yet, so try again until RESUME_WAIT runs out.
    resume_deadline = 0.0

    def on_event(message: dict[str, Any]) -> None:
        nonlocal restarting
        if message.get("event") == "restarting":
            restarting = True
        elif bar is not None and message.get("event") == "progress":
            bar.update(int(message["cached"]), int(message["total"]))

    while True:
        client.set_timeout(None)  # the daemon reports progress; the origin link has timeouts
        try:
            return client.call(
                "cache-all",
                on_event=on_event,
                blocks_per_request=args.blocks_per_request or 31,
                progress=bar is not None,
            )
        except (OSError, ControlError, CommandFailed) as err:
            not_back_yet = not isinstance(err, CommandFailed) and (
                time.monotonic() < resume_deadline
            )
            if not restarting and not not_back_yet:
                raise
        if restarting:
            resume_deadline = time.monotonic() + RESUME_WAIT
        restarting = False
        client.close()
        while True:
            time.sleep(RESUME_POLL)  # the stopping process may still answer, with "restarting"
            try:
                client.reopen()
                break
            except OSError:
                if time.monotonic() > resume_deadline:
                    raise ControlError(
                        f"the server did not come back within {RESUME_WAIT:.0f} s"
                    ) from None
        print("xnbd-bgctl: the server restarted; cache-all goes on", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"xnbd-bgctl: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.cmd or "query"  # a lone socket path means --query, as in the original
    want_extra = 2 if cmd == "reconnect" else 0
    if len(args.extra) != want_extra:
        parser.error(
            "--reconnect needs CONTROL_SOCKET HOST PORT"
            if cmd == "reconnect"
            else f"unexpected arguments: {' '.join(args.extra)}"
        )
    if args.blocks_per_request is not None and args.blocks_per_request < 1:
        parser.error("--blocks-per-request must be at least 1")
    for flag, applies in (
        ("force", cmd == "switch"),
        ("progress", cmd == "cache-all"),
        ("blocks_per_request", cmd == "cache-all"),
        ("exportname", cmd == "reconnect"),
    ):
        if getattr(args, flag) not in (None, False) and not applies:
            _warn(f"ignore --{flag.replace('_', '-')}")
    try:
        client = ControlClient(args.control_socket, timeout=30.0)
    except OSError as exc:
        print(f"xnbd-bgctl: cannot connect to {args.control_socket}: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            return _run(client, cmd, args)
        except CommandFailed as exc:
            print(f"xnbd-bgctl: {cmd} failed: {exc}", file=sys.stderr)
            return 1
        except (OSError, ControlError) as exc:
            print(f"xnbd-bgctl: control connection failed: {exc}", file=sys.stderr)
            return 2


RESUME_WAIT = 60.0  # seconds a restarting server has to listen on its control socket again
RESUME_POLL = 0.2


def _run(client: ControlClient, cmd: str, args: argparse.Namespace) -> int:
    if cmd == "query":
        status = client.call("query")
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_query(status))
        return 0
    if cmd == "switch":
        if args.force:
            _warn(
                "switching to target mode despite an incomplete cache, requested by --force: "
                "blocks never fetched will read as zeros or stale data"
            )
        client.set_timeout(None)  # waits until target mode serves (may finish caching first)
        result = client.call("switch", force=bool(args.force))
        print(json.dumps(result) if args.json else result.get("message", "switched"))
        return 0
    if cmd == "cache-all":
        show = args.progress and sys.stderr.isatty()
        bar = ProgressBar(sys.stderr)
        try:
            result = _cache_all(client, args, bar if show else None)
        finally:
            bar.finish()
        if args.json:
            print(json.dumps(result))
        return 0
    if cmd == "snapshot":
        client.set_timeout(None)  # the copy may take minutes; the daemon answers when done
        result = client.call("snapshot")
        print(json.dumps(result) if args.json else result["path"])
        return 0
    # reconnect
    host, port = args.extra
    result = client.call("reconnect", host=host, port=port, exportname=args.exportname)
    print(
        json.dumps(result, sort_keys=True) if args.json else f"forwarded to {result.get('remote')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
