"""Write a manual page for every program in pyproject.toml's [project.scripts].

The pages come from the programs' own argparse parsers, so options and help texts cannot drift
from the code. Each entry point is called with --help while ArgumentParser's parse methods are
patched to hand back the parser instead of parsing; no program code needs a special hook.

    python3 packaging/gen_man.py OUTDIR       writes OUTDIR/<program>.8

Sections the parser cannot know (signals, files, examples) come from packaging/man/<program>.8.extra
when that file exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

SECTION = "8"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEE_ALSO = ["nbd-client(8)", "nbdinfo(1)", "systemd.socket(5)"]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
    raise _Captured(self)


def capture_parser(prog: str, entry: str) -> argparse.ArgumentParser:
    """Run the entry point "module:function" until it asks its parser to parse."""
    module_name, _, func_name = entry.partition(":")
    main: Callable[[], object] = getattr(importlib.import_module(module_name), func_name)
    saved_argv = sys.argv
    saved = {
        name: getattr(argparse.ArgumentParser, name)
        for name in ("parse_args", "parse_known_args", "parse_intermixed_args")
    }
    sys.argv = [prog, "--help"]
    try:
        for name in saved:
            setattr(argparse.ArgumentParser, name, _capture)
        main()
    except _Captured as captured:
        return captured.parser
    finally:
        sys.argv = saved_argv
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    raise SystemExit(f"gen_man: {prog} ({entry}) returned without parsing its arguments")


def roff(text: str) -> str:
    """Escape plain text for roff: backslashes, hyphens, and control characters at line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def paragraphs(text: str) -> Iterator[str]:
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if any(line.startswith("  ") for line in lines):  # keep indented examples as they are
            yield ".nf\n" + roff(block) + "\n.fi"
        else:
            yield roff(" ".join(line.strip() for line in lines))


def option_label(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    if not action.option_strings:
        return "\\fI" + roff(formatter._metavar_formatter(action, action.dest)(1)[0]) + "\\fR"
    label = ", ".join("\\fB" + roff(opt) + "\\fR" for opt in action.option_strings)
    if action.nargs != 0:
        label += " \\fI" + roff(formatter._format_args(action, action.dest.upper())) + "\\fR"
    return label


def render(parser: argparse.ArgumentParser, summary: str, version: str) -> str:
    prog = parser.prog
    out = [
        f'.TH "{prog.upper()}" "{SECTION}" "" "xnbdd {version}" "System Administration"',
        ".SH NAME",
        f"{roff(prog)} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        *(
            roff(line.strip())
            for line in parser.format_usage().removeprefix("usage: ").split("\n")
            if line.strip()
        ),
        ".fi",
    ]
    if parser.description:
        out.append(".SH DESCRIPTION")
        out.append("\n.PP\n".join(paragraphs(parser.description)))
    formatter = parser._get_formatter()
    out.append(".SH OPTIONS")
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            out.append(f".SS {roff(group.title or '')}")
        for action in actions:
            out.append(".TP")
            out.append(option_label(parser, action))
            out.append(roff(formatter._expand_help(action)) if action.help else "")
    if parser.epilog:
        out.append(".SH NOTES")
        out.append("\n.PP\n".join(paragraphs(parser.epilog)))
    extra = HERE / "man" / f"{prog}.{SECTION}.extra"  # hand-written sections, already roff
    if extra.exists():
        out.append(extra.read_text().rstrip("\n"))
    out.append(".SH SEE ALSO")
    out.append(
        ", ".join(f"\\fB{roff(ref.split('(')[0])}\\fR({ref.split('(')[1]}" for ref in SEE_ALSO)
    )
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUTDIR")
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sys.path.insert(0, str(REPO))
    for prog, entry in sorted(project["scripts"].items()):
        parser = capture_parser(prog, entry)
        parser.prog = prog
        summary = (parser.description or project["description"]).strip().split("\n")[0]
        summary = summary.split(". ")[0].rstrip(".")
        page = outdir / f"{prog}.{SECTION}"
        page.write_text(render(parser, summary, project["version"]))
        print(page)


if __name__ == "__main__":
    main()
