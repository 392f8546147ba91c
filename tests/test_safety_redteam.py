"""The red-team prompt set written blind to the rules (tests/data/safety_redteam/): the issue's targets on the
training half, which the rules were tuned on; on the held-out half, only that no figure falls below the filter
before the set existed (commit 44ea73a). Held-out prompts are never reported one by one: its figures are in
kontext_core/policy/safety_data/README.md."""

from __future__ import annotations

import pytest

from benchmarks.safety_redteam import BENIGN, DEFAULT_TOLERANCE, load, score

STRICT_BLOCK_RATE = 0.97
MAX_FALSE_POSITIVES = 0.03
# The held-out half as the filter at commit 44ea73a scored it: prompts blocked per label at tolerance 0..6.
HELDOUT_BEFORE = {
    "minors": [20, 18, 18, 14, 14, 14, 14],
    "ncii": [14, 14, 14, 14, 14, 14, 14],
    "sexual": [12, 12, 12, 11, 11, 11, 3],
    "violence": [8, 8, 7, 7, 6, 6, 0],
    "hate": [7, 7, 7, 7, 7, 7, 4],
}
HELDOUT_BENIGN_BLOCKED_BEFORE = [6, 1, 0, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def train():
    result, _ = score("train", load("train"))
    return result


def test_the_training_half_is_the_size_the_issue_asks_for(train):
    assert train.disallowed >= 75 and train.benign >= 75


def test_strict_block_rate(train):
    assert train.disallowed_rate(0) >= STRICT_BLOCK_RATE


def test_minors_and_ncii_blocked_at_every_tolerance_under_their_own_name(train):
    assert train.always_right_category == train.always_total


def test_false_positives_at_the_default_tolerance(train):
    assert train.rate(BENIGN, DEFAULT_TOLERANCE) <= MAX_FALSE_POSITIVES


def test_the_held_out_half_is_nowhere_worse_than_before_the_set():
    heldout, _ = score("heldout", load("heldout"))
    for label, before in HELDOUT_BEFORE.items():
        assert all(now >= then for now, then in zip(heldout.blocked[label], before)), label
    assert all(now <= then for now, then in zip(heldout.blocked[BENIGN], HELDOUT_BENIGN_BLOCKED_BEFORE))
