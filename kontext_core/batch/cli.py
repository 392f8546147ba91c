"""`python -m kontext_core.batch`: many edits with the library, in this process or on Ray actors.

    python -m kontext_core.batch --csv items.csv --out results/                 # in this process
    python -m kontext_core.batch --csv items.csv --out results/ --ray           # a local Ray instance
    python -m kontext_core.batch --images photos/ --prompt "make it red" --out results/ --ray 10.0.0.1:6379

CSV columns image,prompt,seed (image paths relative to the CSV; an empty seed is 0). Each output,
DIR/<name>.png, is written whole, and DIR/manifest.jsonl gets one line per finished item (item, image,
prompt, seed, attempts, seconds, output, sha256, worker); a rerun skips what is done. The model options are
the `edit` command's (the built-in small model when none are given), as are the defaults: 28 steps,
guidance 2.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kontext_core.batch.items import BatchError, add_item_options, items_from_args
from kontext_core.batch.ray_pool import LOCAL
from kontext_core.batch.run import Batch
from kontext_core.batch.worker import EditSettings
from kontext_core.cli.errors import in_flags
from kontext_core.cli.options import at_least
from kontext_core.cli.parser import _add_model_options, _add_safety_options

# options that change what an item's output is: a rerun with any of them changed redoes every item
MODEL_OPTIONS = (
    "comfyui",
    "transformer",
    "vae",
    "t5",
    "clip",
    "t5_tokenizer",
    "clip_tokenizer",
    "t5_max_length",
    "small_model",
    "dtype",
    "weight_dtype",
    "lora",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_core.batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_item_options(parser, default_seed="0")
    parser.add_argument("--out", required=True, type=Path, help="folder for the outputs and manifest.jsonl")
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="run on Ray actors: alone, a local Ray instance; with an address (host:6379, ray://host:10001), a cluster",
    )
    parser.add_argument(
        "--workers",
        type=at_least(1),
        help="Ray actors (default: one per GPU of the cluster; 1 on a cluster without GPUs)",
    )
    parser.add_argument("--steps", type=at_least(1), default=28)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument(
        "--resize",
        choices=["stretch", "crop", "keep"],
        help="reference sizing; default stretch (real model) or keep (small model)",
    )
    parser.add_argument("--reference-method", choices=["offset", "index", "uxo"], default="offset")
    _add_safety_options(parser)
    _add_model_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.ray is None:
        parser.error("--workers goes with --ray (without it the batch runs in this process)")
    settings = EditSettings(
        steps=args.steps,
        guidance=args.guidance,
        resize=args.resize,
        reference_method=args.reference_method,
        safety_tolerance=None if args.no_safety_check else args.safety_tolerance,
    )
    try:
        items = items_from_args(parser, args)
        identity = {"settings": vars(settings), "model": {name: getattr(args, name) for name in MODEL_OPTIONS}}
        batch = Batch(items, args.out, identity)
        if not args.no_safety_check:
            batch.refuse_blocked_prompts(args.safety_tolerance)
        if batch.todo:
            _run(batch, args, settings)
    except (BatchError, FileNotFoundError, ValueError) as e:  # a bad input or a model that cannot load
        print(f"error: {in_flags(str(e))}", file=sys.stderr)
        return 2
    batch.log(f"{batch.done} done, {batch.skipped} already done, {batch.failed} failed; results in {args.out}")
    return 1 if batch.failed else 0


def _run(batch: Batch, args: argparse.Namespace, settings: EditSettings) -> None:
    if args.ray is None:
        from kontext_core.batch.run import run_in_process
        from kontext_core.batch.worker import EditWorker

        run_in_process(batch, EditWorker(args, settings))
        return
    from kontext_core.batch.ray_pool import RayPool

    pool = RayPool(args.ray, args.workers, args, settings)
    try:
        batch.log(f"running on {pool.description}")
        pool.run(batch)
    finally:
        pool.close()
