"""Every reference in the tree can be followed inside the tree.

Comments, docstrings, tests and docs cite documents (``docs/compat.md §4.2``), decisions
(``D14``, defined in docs/decisions.md) and protocol rules (``test_rule20``, ``rule 49``, defined
in docs/protocol-rules.md). This test reads every file of the checkout (tracked or new, as git
lists them) and fails on a citation that leads nowhere: a team note that lives outside the
repository, a ``docs/NAME.md`` that does not exist, a section of docs/compat.md that has no
heading, a decision or a rule that is not defined.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
COMPAT = "docs/compat.md"
DECISIONS = "docs/decisions.md"
RULES = "docs/protocol-rules.md"

# The team's notes these citations used to point at; none of them ships with the project.
OUTSIDE_NOTES = (
    "xnbd-compat.md",
    "nbd-protocol.md",
    "testing-with-systemd.md",
    "architecture.md",
    "ceph-testing.md",
)
SHARED_SPEC = re.compile(r"shared/spec\b")
DOCS_FILE = re.compile(r"(?<![\w/.-])docs/([\w.-]+?\.md)\b")
INSTALLED_DOC = re.compile(r"/usr/share/doc/xnbdd/([\w.-]+?\.md)\b")
# "docs/compat.md §1.2, §7" or "docs/compat.md §4.4 and §5": the whole run belongs to the file.
COMPAT_CITATION = re.compile(r"docs/compat\.md((?:(?:,|,? and)? ?§\d+(?:\.\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
DECISION = re.compile(r"\bD(\d{1,2})(?:\s?[-\u2013]\s?D(\d{1,2}))?\b")
# "docs/decisions.md D14, D17, D22" or "docs/decisions.md D15-D19": the run names its document.
DECISION_CITATION = re.compile(
    r"docs/decisions\.md((?:(?:,|,? and)? ?D\d{1,2}(?:\s?[-\u2013]\s?D\d{1,2})?\b)+)"
)
# test_rule20_..., test_rule16_17_... (consecutive rules), test_rule24_to_26_... (a range); in
# test_rule44_64_requests_... the 64 is not a rule, since it does not follow 44.
RULE_TEST = re.compile(r"\bdef test_rule(\d+)((?:_(?:to_)?\d+)*)_")
RULE_TEXT = re.compile(r"\b[Rr]ules? (\d+)(?:(?: to |[-\u2013])(\d+))?\b")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


@cache
def repo_files() -> tuple[str, ...]:
    """Paths (relative, POSIX) of the checkout's files: what git tracks plus new, unignored ones;
    outside a git checkout, every file below the repository minus caches and the venv."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names += [(Path(root) / f).relative_to(REPO).as_posix() for f in files]
    return tuple(sorted(n for n in names if (REPO / n).is_file()))


@cache
def texts() -> dict[str, str]:
    """Each text file's content (binary files and this test itself left out)."""
    found: dict[str, str] = {}
    for name in repo_files():
        if name == THIS:
            continue  # it names the outside notes in order to forbid them
        data = (REPO / name).read_bytes()
        if b"\0" in data:
            continue
        try:
            found[name] = data.decode()
        except UnicodeDecodeError:
            continue
    return found


def where(name: str, text: str, pos: int) -> str:
    return f"{name}:{text.count(chr(10), 0, pos) + 1}"


def read_doc(path: str) -> str:
    assert (REPO / path).is_file(), f"{path} is missing"
    return (REPO / path).read_text()


def test_no_citation_of_notes_outside_the_repository() -> None:
    present = {Path(n).name for n in repo_files()}
    bad = []
    for name, text in texts().items():
        for m in SHARED_SPEC.finditer(text):
            bad.append(f"{where(name, text, m.start())}: {m.group(0)}")
        for note in OUTSIDE_NOTES:
            if note in present:
                continue
            for m in re.finditer(rf"(?<![\w-]){re.escape(note)}", text):
                bad.append(f"{where(name, text, m.start())}: {note}")
    assert not bad, "cite the in-repository docs/ instead of:\n" + "\n".join(bad)


def test_cited_docs_files_exist() -> None:
    bad = []
    for name, text in texts().items():
        for m in DOCS_FILE.finditer(text):
            if not (REPO / "docs" / m.group(1)).is_file():
                bad.append(f"{where(name, text, m.start())}: docs/{m.group(1)}")
        for m in INSTALLED_DOC.finditer(text):  # units' Documentation= lines
            doc = m.group(1)
            if not ((REPO / "docs" / doc).is_file() or (REPO / doc).is_file()):
                bad.append(f"{where(name, text, m.start())}: {m.group(0)}")
    assert not bad, "no such document:\n" + "\n".join(bad)


def compat_sections() -> set[str]:
    """Section numbers of docs/compat.md: "## 4. …" gives "4", "### 4.2 …" gives "4.2"."""
    heading = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
    return {m.group(1) for m in heading.finditer(read_doc(COMPAT))}


def test_compat_sections_cited_exist() -> None:
    sections = compat_sections()
    bad = []
    for name, text in texts().items():
        cited = []
        covered: set[int] = set()
        for m in COMPAT_CITATION.finditer(text):
            for s in SECTION.finditer(m.group(1)):
                cited.append((m.start(1) + s.start(), s.group(1)))
                covered.add(m.start(1) + s.start())
        if name == COMPAT:  # the document refers to its own sections with a bare §
            cited += [(s.start(), s.group(1)) for s in SECTION.finditer(text)]
        else:
            for s in SECTION.finditer(text):
                if s.start() not in covered:
                    bad.append(f"{where(name, text, s.start())}: §{s.group(1)} of which document?")
        for pos, number in cited:
            if number not in sections:
                bad.append(f"{where(name, text, pos)}: {COMPAT} has no §{number}")
    assert not bad, "\n".join(bad)


def defined_decisions() -> set[int]:
    """Decisions docs/decisions.md defines, each with a heading "## D14 ..." or "### D14 ..."."""
    return {int(m.group(1)) for m in re.finditer(r"^#{2,3} D(\d+)\b", read_doc(DECISIONS), re.M)}


def test_cited_decisions_are_defined() -> None:
    defined = defined_decisions()
    assert defined, f"{DECISIONS} defines no decision"
    bad = []
    for name, text in texts().items():
        if name == DECISIONS:
            continue
        covered = {
            c.start(1) + d.start()
            for c in DECISION_CITATION.finditer(text)
            for d in DECISION.finditer(c.group(1))
        }
        for m in DECISION.finditer(text):
            if not name.startswith("docs/") and m.start() not in covered:
                bad.append(f"{where(name, text, m.start())}: {m.group(0)} of which document?")
            first = int(m.group(1))
            last = int(m.group(2) or first)
            for number in range(first, last + 1):
                if number not in defined:
                    bad.append(f"{where(name, text, m.start())}: D{number}")
    assert not bad, f"decisions not defined in {DECISIONS}, or cited without it:\n" + "\n".join(bad)


def defined_rules() -> set[int]:
    """Rules docs/protocol-rules.md defines: list items "12. ..." at the start of a line."""
    return {int(m.group(1)) for m in re.finditer(r"^(\d+)\. ", read_doc(RULES), re.MULTILINE)}


def test_cited_protocol_rules_are_defined() -> None:
    defined = defined_rules()
    assert defined, f"{RULES} defines no rule"
    bad = []
    for name, text in texts().items():
        if name == RULES:
            continue
        cited: list[tuple[int, int]] = []
        for m in RULE_TEST.finditer(text):
            numbers = [int(m.group(1))]
            for joint, number in re.findall(r"_(to_)?(\d+)", m.group(2)):
                if joint:
                    numbers += range(numbers[-1] + 1, int(number) + 1)
                elif int(number) == numbers[-1] + 1:
                    numbers.append(int(number))
                else:
                    break  # words of the test's name from here on
            cited += [(m.start(), n) for n in numbers]
        if name.startswith("tests/") or name.startswith("xnbdd/"):
            for m in RULE_TEXT.finditer(text):
                first = int(m.group(1))
                cited += [(m.start(), n) for n in range(first, int(m.group(2) or first) + 1)]
        bad += [f"{where(name, text, pos)}: rule {n}" for pos, n in cited if n not in defined]
    assert not bad, f"rules not defined in {RULES}:\n" + "\n".join(bad)
