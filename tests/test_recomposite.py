"""keep_unchanged: which pixels count as changed, in 8-bit levels, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from kontext_core.recomposite import keep_unchanged


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
