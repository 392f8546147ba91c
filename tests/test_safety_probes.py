"""The prompts the round-2 rules were probed with (tests/data/safety_probes_round2.tsv, written while writing the
rules, not taken from either red-team set): each disallowed one blocked at tolerance 0 (minors and ncii at every
tolerance), each benign one allowed at the default tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.safety import labelled_prompts

from kontext_core.policy.safety import CATEGORIES, DEFAULT_TOLERANCE, MAX_TOLERANCE, MIN_TOLERANCE, check_prompt

DATA = Path(__file__).parent / "data" / "safety_probes_round2.tsv"
ALWAYS_BLOCKED = ("minors", "ncii")
BENIGN = "allowed"


ROWS = labelled_prompts(DATA)


def test_the_probe_file_holds_every_label():
    assert {label for label, _ in ROWS} == {*CATEGORIES, BENIGN}


@pytest.mark.parametrize("label,prompt", [r for r in ROWS if r[0] != BENIGN])
def test_disallowed_probes_are_blocked(label, prompt):
    tolerances = range(MIN_TOLERANCE, MAX_TOLERANCE + 1) if label in ALWAYS_BLOCKED else (MIN_TOLERANCE,)
    for tolerance in tolerances:
        assert check_prompt(prompt, tolerance).blocked, (tolerance, check_prompt(prompt, tolerance).reason)


def test_benign_probes_pass_at_the_default_tolerance():
    verdicts = [(p, check_prompt(p, DEFAULT_TOLERANCE)) for label, p in ROWS if label == BENIGN]
    assert not [(p, v.reason) for p, v in verdicts if v.blocked]
