"""A batch's items, from a folder of images or a CSV: shared by the library runner and the ComfyUI client.

Standard library only: the ComfyUI client imports this from any Python, without torch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class BatchError(RuntimeError):
    """A batch cannot start, or one item cannot run; the message is what the user needs to fix it."""


@dataclass(frozen=True)
class Item:
    name: str  # stem of the output files, unique within a batch
    image: Path
    prompt: str | None
    seed: int | None
    source: str | int = ""  # what the manifest's `item` names: the CSV row number, or the image's file name

    def key(self, settings: object) -> str:
        """Identity for resuming: the image bytes, prompt, seed and the run's settings (a ComfyUI workflow, the
        library's model and sampling options), so an edited row is redone, and the name its outputs get, so a row
        that moved in the CSV (names carry the row number) or a duplicate row runs for itself instead of taking
        another row's files."""
        digest = hashlib.sha256(self.image.read_bytes())
        digest.update(json.dumps([self.name, self.prompt, self.seed, settings], sort_keys=True).encode())
        return digest.hexdigest()[:32]


def items_from_folder(folder: Path, prompt: str, seed: int | None = None) -> list[Item]:
    if not folder.is_dir():
        raise BatchError(f"--images: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise BatchError(f"--images: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [p.stem for p in files]
    # a.png and a.jpg would write the same a_0.png: such names keep their extension
    return [
        Item(p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix[1:]}", p, prompt, seed, p.name) for p in files
    ]


def items_from_csv(path: Path) -> list[Item]:
    """Rows of `image,prompt,seed` (seed may be empty); image paths are relative to the CSV's folder."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0]) if rows else set()
    except OSError as e:
        raise BatchError(f"--csv: cannot read {path}: {e.strerror}") from None
    if not rows:
        raise BatchError(f"--csv: {path} has no rows (expected a header line 'image,prompt,seed' and one row per item)")
    missing = {"image", "prompt"} - columns
    if missing:
        raise BatchError(f"--csv: {path} lacks column(s) {sorted(missing)}; expected image,prompt,seed")
    items = []
    for number, row in enumerate(rows, start=1):
        where = f"--csv: {path} row {number}"
        image = path.parent / (row["image"] or "").strip()
        if not row["image"] or not image.is_file():
            raise BatchError(f"{where}: image {row['image']!r} is not a file (relative to {path.parent})")
        seed_text = (row.get("seed") or "").strip()
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise BatchError(f"{where}: seed must be a whole number, got {seed_text!r}") from None
        if seed is not None and seed < 0:
            raise BatchError(f"{where}: seed must be 0 or more, got {seed}")
        items.append(Item(f"{number:04d}_{image.stem}", image, row["prompt"], seed, number))
    return items


def add_item_options(parser: argparse.ArgumentParser, default_seed: str) -> None:
    """--csv or --images (+ --prompt, --seed): the items, the same way for both batch runners."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV with columns image,prompt,seed (seed may be empty)")
    source.add_argument("--images", type=Path, help="folder of images, each run with --prompt")
    parser.add_argument("--prompt", help="the instruction for every image of --images")
    parser.add_argument("--seed", type=int, help=f"seed for every image of --images (default: {default_seed})")


def items_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Item]:
    """The items of add_item_options' flags; a usage error exits through the parser, a bad file raises BatchError."""
    if args.images is not None and args.prompt is None:
        parser.error("--images needs --prompt")
    if args.csv is not None and (args.prompt is not None or args.seed is not None):
        parser.error("--prompt and --seed go with --images; a CSV carries them per row")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.images is not None:
        return items_from_folder(args.images, args.prompt, args.seed)
    return items_from_csv(args.csv)
