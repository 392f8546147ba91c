"""keep_unchanged: which pixels count as changed, in 8-bit levels, and what it refuses; drift, measured with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kontext_core.recomposite import drift, keep_unchanged


def test_a_pixel_is_changed_above_the_threshold_in_any_channel_and_the_region_grows():
    before = torch.full((1, 3, 9, 9), 100 / 255)
    after = before.clone()
    after[0, 2, 4, 4] = 141 / 255  # one channel, 41 levels: changed
    after[0, 0, 0, 0] = 140 / 255  # 40 levels: not
    image, changed = keep_unchanged(before, after, threshold=40, grow=1)
    assert changed[0, 3:6, 3:6].all() and changed.sum() == 9
    assert torch.equal(image[..., 3:6, 3:6], after[..., 3:6, 3:6]) and image[0, 0, 0, 0] == before[0, 0, 0, 0]
    assert keep_unchanged(before, after, threshold=40, grow=0)[1].sum() == 1


@pytest.mark.parametrize(
    ("before", "after", "options", "message"),
    [
        ((1, 3, 8, 8), (1, 3, 8, 9), {}, "one size"),
        ((2, 3, 8, 8), (3, 3, 8, 8), {}, "before holds 2 images"),
        ((1, 3, 8, 8), (1, 3, 8, 8), {"threshold": 256}, "threshold must be 0..255"),
        ((1, 3, 8, 8), (1, 3, 8, 8), {"grow": -1}, "grow at least 0"),
    ],
)
def test_bad_inputs_are_named(before, after, options, message):
    with pytest.raises(ValueError, match=message):
        keep_unchanged(torch.zeros(before), torch.zeros(after), **options)


def test_drift_is_the_psnr_to_the_original_over_the_pixels_no_round_edited():
    original = np.full((10, 12, 3), 100, np.uint8)
    round1, round2 = original + 3, original + 6  # every pixel drifts 3 levels a round, below the threshold
    round1[1, 1] = round2[1, 1] = 250  # round 1 edits one pixel, which round 2 keeps
    round2[9, 11] = 0  # round 2 edits another, in the corner
    result = drift([original, round1, round2], threshold=40, grow=1)
    # each edit with its 3×3 neighbourhood (grow 1) is left out; the rest is 6 levels off the original
    assert result.unedited_fraction == (120 - 9 - 4) / 120  # the corner one keeps 2×2 of its 3×3
    assert result.psnr_db == pytest.approx(10 * math.log10(255**2 / 36), abs=1e-12)
    assert drift([original, original]).psnr_db == math.inf
    assert drift([original, original + 200]) == (None, 0.0)  # every pixel edited: nothing to measure


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ([np.zeros((4, 4, 3), np.uint8)], "at least one round"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)], "chain image 1 must be"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)], "8-bit"),
    ],
)
def test_drift_refuses_a_chain_it_cannot_measure(chain, message):
    with pytest.raises(ValueError, match=message):
        drift(chain)
