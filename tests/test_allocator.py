"""xnbdd/allocator.py: applied on glibc, and an administrator's MALLOC_ARENA_MAX wins."""

from __future__ import annotations

import pytest

from xnbdd.allocator import limit_arenas


def test_applied_without_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_arenas() is True  # this test machine runs glibc


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_arenas() is False
