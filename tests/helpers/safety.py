"""Shared pieces of the prompt-filter tests: the labelled prompt files and the every-tolerance check."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kontext_core.policy.safety import MAX_TOLERANCE, MIN_TOLERANCE, check_prompt

EVERY_TOLERANCE = range(MIN_TOLERANCE, MAX_TOLERANCE + 1)


def labelled_prompts(path: Path) -> list[tuple[str, str]]:
    """(label, prompt) rows of a tab-separated file; blank lines and # comments skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, prompt = line.split("\t")
            rows.append((label, prompt))
    return rows


def assert_blocked_as(prompt: str, category: str, tolerances: Iterable[int] = EVERY_TOLERANCE) -> None:
    for tolerance in tolerances:
        verdict = check_prompt(prompt, tolerance)
        assert verdict.blocked and verdict.category == category, (tolerance, verdict)
