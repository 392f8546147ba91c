"""Training data from the synthetic task generator: every image a task holds, grouped by size.

Only seeds below `tasks.HELD_OUT_SEED` are ever used, so held-out benchmarks stay unseen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kontext_core.synthetic.tasks import HELD_OUT_SEED, EditTask, make_task


def check_training_seeds(first: int, count: int) -> None:
    """Raises unless seeds `first` .. `first + count` - 1 are all training seeds (none held out)."""
    if first < 0 or count < 0 or first + count > HELD_OUT_SEED:
        raise ValueError(f"training seeds must lie in [0, {HELD_OUT_SEED}), got {first}..{first + count - 1}")


def training_tasks(first: int, count: int) -> Iterator[EditTask]:
    check_training_seeds(first, count)
    for seed in range(first, first + count):
        yield make_task(seed)


def to_uint8(image: Image.Image) -> Tensor:
    """3×H×W uint8 (compact for pools of thousands of images)."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def to_signed(batch: Tensor) -> Tensor:
    """uint8 B×3×H×W → float in [-1, 1], as `pipeline.image_to_tensor`."""
    return batch.float() / 127.5 - 1.0


def image_pool(first: int, count: int) -> dict[tuple[int, int], Tensor]:
    """Every reference and target image of `count` training tasks, as uint8 N×3×H×W per (H, W)."""
    by_size: dict[tuple[int, int], list[Tensor]] = {}
    for task in training_tasks(first, count):
        for image in (*task.images, task.target):
            by_size.setdefault((image.height, image.width), []).append(to_uint8(image))
    return {size: torch.stack(images) for size, images in by_size.items()}


def draw_batches(
    counts: list[int], batch: int, generator: torch.Generator, row_weights: list[Tensor] | None = None
) -> Iterator[tuple[int, Tensor]]:
    """Endless (group, row indices) draws: a group in proportion to its row count, then `batch` rows of it;
    with `row_weights` (one tensor per group), a group in proportion to its total weight and rows by weight."""
    if row_weights is None:
        weights = torch.tensor(counts, dtype=torch.float64)
    else:
        weights = torch.stack([w.sum() for w in row_weights]).double()
    while True:
        group = int(torch.multinomial(weights, 1, generator=generator))
        if row_weights is None:
            yield group, torch.randint(counts[group], (batch,), generator=generator)
        else:
            yield group, torch.multinomial(row_weights[group], batch, replacement=True, generator=generator)


def size_batches(pool: dict[tuple[int, int], Tensor], batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless random batches, each of one image size, sizes drawn in proportion to their counts."""
    images = list(pool.values())
    for group, rows in draw_batches([len(i) for i in images], batch, generator):
        yield images[group][rows]
