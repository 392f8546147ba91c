"""Keeping what an edit did not change: the edited image with the original's pixels wherever the edit left them.

Each VAE round trip and each pass through the transformer moves every pixel a little, so an image edited again
and again drifts (colours shift, detail softens) even where no instruction touched it. Putting the original's
pixels back wherever the edit did not visibly change them holds back that drift outside the edits, with no mask
to draw: the changed region is found by comparing the two images. Pixels a round moved by more than the threshold
still change. Measured on the built-in small model over ten chained edits (benchmarks/RESULTS.md, drift table):
ahead of plain chaining in every round, by 0.2-0.4 dB there; it slows the drift, it does not stop it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_THRESHOLD = 40  # 8-bit levels: larger than the small drift of a round trip, smaller than an edit
DEFAULT_GROW = 2  # pixels: an edit's soft edges come from the edited image whole


class Drift(NamedTuple):
    psnr_db: float | None  # dB over the pixels no round edited; None when every pixel was edited
    unedited_fraction: float  # the share of the image those pixels cover


def keep_unchanged(
    before: Tensor, after: Tensor, *, threshold: int = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW
) -> tuple[Tensor, Tensor]:
    """`after` with `before`'s pixels wherever the edit did not visibly change them, and where it did (the mask).

    Images are B×C×H×W in [0, 1] (`before` may hold one image for all of `after`'s). A pixel counts as changed
    when any channel, in 8-bit levels, moved by more than `threshold`; the changed region is then grown by
    `grow` pixels in every direction. Returns (the image, B×H×W mask with 1 where it comes from `after`).
    """
    if before.ndim != 4 or after.ndim != 4 or before.shape[1:] != after.shape[1:]:
        raise ValueError(
            f"before and after must be B×C×H×W images of one size, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    if before.shape[0] not in (1, after.shape[0]):
        raise ValueError(f"before holds {before.shape[0]} images; expected 1, or as many as after ({after.shape[0]})")
    if not 0 <= threshold <= 255 or grow < 0:
        raise ValueError(f"threshold must be 0..255 levels and grow at least 0, got {threshold} and {grow}")
    before = before.to(after.device, after.dtype).expand_as(after)
    levels = ((before * 255).round() - (after * 255).round()).abs().amax(dim=1)  # what an 8-bit file would hold
    changed = (levels > threshold).to(after.dtype)[:, None]
    if grow:  # a square neighbourhood, as a row then a column: the cost grows with `grow`, not its square
        changed = torch.nn.functional.max_pool2d(changed, (1, 2 * grow + 1), stride=1, padding=(0, grow))
        changed = torch.nn.functional.max_pool2d(changed, (2 * grow + 1, 1), stride=1, padding=(grow, 0))
    return torch.where(changed.bool(), after, before), changed[:, 0]


def drift(chain: list[np.ndarray], *, threshold: int = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW) -> Drift:
    """How far the last image of an edit chain has moved from the first where no round edited it.

    `chain` holds the original then each round's result, 8-bit H×W×3 arrays of one size. A round edited the
    pixels `keep_unchanged` finds changed between it and the round before (so no mask is needed); the PSNR of
    the last image against the original is taken over the pixels no round edited. `psnr_db` is None when every
    pixel was edited, and inf when the unedited pixels are exactly the original's.
    """
    from kontext_core.synthetic.judge import psnr  # the quality code's PSNR; synthetic/ is imported lazily

    if len(chain) < 2:
        raise ValueError(f"a drift chain needs the original and at least one round, got {len(chain)} image(s)")
    for i, image in enumerate(chain):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape != chain[0].shape or image.shape[2] != 3:
            raise ValueError(
                f"chain image {i} must be an 8-bit H×W×3 array of the original's size {chain[0].shape}, "
                f"got {image.dtype} {image.shape}"
            )
    images = [torch.tensor(image).permute(2, 0, 1)[None].float() / 255 for image in chain]
    edited = torch.zeros(chain[0].shape[:2], dtype=torch.bool)
    for before, after in zip(images, images[1:]):
        edited |= keep_unchanged(before, after, threshold=threshold, grow=grow)[1][0].bool()
    unedited = ~edited.numpy()
    fraction = float(unedited.mean())
    return Drift(psnr(chain[0], chain[-1], unedited) if unedited.any() else None, fraction)
