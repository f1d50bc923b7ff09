"""The house rules that a reader of the tree relies on, checked so they stay true."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xnbdd"
MAX_MODULE_LINES = 650  # one concern a module: past this a module holds two


def test_every_module_stays_small_enough_to_read_whole() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert sizes, "no modules found"
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
