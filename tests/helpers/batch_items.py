"""Batch inputs from held-out synthetic tasks (one reference each), as a CSV the batch runners read."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kontext_core.synthetic.tasks import HELD_OUT_SEED, make_task


@dataclass(frozen=True)
class TaskItem:
    name: str  # the runners' output stem for the CSV row
    image: Path
    prompt: str
    seed: int


def write_task_csv(folder: Path, count: int) -> tuple[Path, list[TaskItem]]:
    """`count` single-reference edits (text-to-image and two-reference tasks skipped), seeds 0, 1, 2 ..."""
    folder.mkdir(parents=True, exist_ok=True)
    items, task_seed = [], HELD_OUT_SEED
    while len(items) < count:
        task = make_task(task_seed)
        task_seed += 1
        if len(task.images) != 1:
            continue
        number = len(items) + 1
        image = folder / f"scene_{number}.png"
        task.images[0].save(image)
        items.append(TaskItem(f"{number:04d}_{image.stem}", image, task.instruction, number % 7))
    csv_path = folder / "items.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "seed"])
        writer.writerows([item.image.name, item.prompt, item.seed] for item in items)
    return csv_path, items


def serial_edit(pipe, item: TaskItem, steps: int) -> Image.Image:
    """The library's own output for the item: what every batch runner must reproduce."""
    with Image.open(item.image) as image:
        return pipe.edit(image.convert("RGB"), item.prompt, seed=item.seed, steps=steps)
