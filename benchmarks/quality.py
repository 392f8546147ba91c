"""Quality of the shipped small model on held-out synthetic tasks, judged against the rendered truth.

    python -m benchmarks.quality --json quality.json                        # the tables in RESULTS.md (20 per kind)
    python -m benchmarks.quality --per-kind 3 --drift-scenes 1 --variants exact   # a quick look

Held-out tasks are seeds from `tasks.HELD_OUT_SEED` up (never trained on; `--first-seed 0` judges training tasks
instead, to measure the gap). Reports, per task kind: edit success (`quality.judge`), PSNR to the truth, PSNR of
the pixels the edit must not touch; then drift over 10 chained edits with and without drift control, and the
fp8-weight and fast-mode paths against the exact one on the same tasks (success, and PSNR of their outputs to
the exact path's; the fp8 path is skipped for a transformer stored in fp8, such as the shipped one: measure it
on the full-precision file). The truth itself through the VAE, judged the same way, gives the ceiling the VAE
sets for any transformer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from kontext_core.checkpoints.transformer import load_transformer, stored_fp8_dtype
from kontext_core.cli.options import at_least
from kontext_core.files import written_whole
from kontext_core.pipeline import KontextPipeline
from kontext_core.synthetic.judge import judge, psnr
from kontext_core.recomposite import keep_unchanged
from kontext_core.sampling import get_noise, sample
from kontext_core.small_model import load_default_pipeline, small_model_files
from kontext_core.synthetic.tasks import HELD_OUT_SEED, KINDS, EditTask, make_task
from kontext_core.synthetic.render import Scene, Shape, coverage, render

DRIFT_ROUNDS = 10
DRIFT_METHODS = ("plain", "recomposite", "latent")  # without drift control, then the two controls


def run_task(pipe: KontextPipeline, task: EditTask, **options) -> Image.Image:
    if task.kind == "text_to_image":
        options.pop("reference_cache_every", None)
        return pipe.generate(task.instruction, width=task.target.width, height=task.target.height, **options)
    return pipe.edit(task.images, task.instruction, **options)


def benchmark_tasks(per_kind: int, first_seed: int = HELD_OUT_SEED) -> list[EditTask]:
    """`per_kind` tasks of every kind from consecutive seeds: held-out by default; with a training seed, the
    same judging measures how much better the model does on what it was trained on."""
    return [make_task(first_seed + i * len(KINDS) + k) for i in range(per_kind) for k in range(len(KINDS))]


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(statistics.fmean(finite), 2) if finite else None


def tabulate(tasks: list[EditTask], outputs: list[Image.Image]) -> dict:
    """Per kind and over the single edits: success and PSNRs of `outputs`, judged against each task's truth."""
    rows: dict[str, list] = {}
    for task, out in zip(tasks, outputs, strict=True):
        rows.setdefault(task.kind, []).append((judge(task, out), task.held_out))
    table = {}
    for kind, results in rows.items():
        judged = [j for j, _ in results]
        held = [j.success for j, h in results if h]
        table[kind] = {
            "tasks": len(judged),
            "success": round(sum(j.success for j in judged) / len(judged), 3),
            "success_held_out_combinations": round(sum(held) / len(held), 3) if held else None,
            "psnr_target_db": _mean([j.psnr_target for j in judged]),
            "psnr_unedited_db": _mean([j.psnr_unedited for j in judged]),
            "psnr_unedited_min_db": min(
                (round(j.psnr_unedited, 2) for j in judged if j.psnr_unedited is not None), default=None
            ),
        }
    single = [k for k in table if k not in ("text_to_image", "two_reference")]
    edits = [r for k in single for r in rows[k]]
    table["single_edits"] = {
        "tasks": len(edits),
        "success": round(sum(j.success for j, _ in edits) / len(edits), 3),
        "psnr_unedited_db": _mean([j.psnr_unedited for j, _ in edits]),
    }
    return table


def evaluate(pipe: KontextPipeline, tasks: list[EditTask], **options) -> tuple[dict, list[Image.Image]]:
    outputs = [run_task(pipe, task, **options) for task in tasks]
    return tabulate(tasks, outputs), outputs


def vae_round_trips(pipe: KontextPipeline, tasks: list[EditTask]) -> list[Image.Image]:
    """Each task's truth encoded and decoded: what a transformer that made no error at all would output, so
    judging these gives the ceiling the VAE sets."""
    return [pipe.decode(pipe.encode_images([task.target])[0])[0] for task in tasks]


def _recolor_round(scene: Scene, shape: Shape, colour: str) -> tuple[EditTask, Shape]:
    new = dataclasses.replace(shape, colour=colour)
    target = Scene(scene.size, scene.background, tuple(new if s == shape else s for s in scene.shapes))
    task = EditTask(
        images=[render(scene)],
        instruction=f"Make the {shape.name} {colour}.",
        target=render(target),
        kind="recolor",
        seed=-1,
        scenes=(scene,),
        target_scene=target,
        focus=(shape, new),
    )
    return task, new


def recomposite(before: Image.Image, after: Image.Image) -> Image.Image:
    """Keep `before`'s pixels wherever the edit did not visibly change them (no truth used; the engine's
    `keep_unchanged` with its defaults, which the Keep Unchanged node offers too)."""
    kept, _ = keep_unchanged(image_to_unit(before), image_to_unit(after))
    return Image.fromarray((kept[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def image_to_unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def drift(pipe: KontextPipeline, seed: int, method: str, steps: int) -> list[dict]:
    """Ten chained recolours of one object (there and back), each round editing the previous output.
    method: "plain" (decode, re-encode), "recomposite" (plain + keep unchanged pixels), "latent" (chain the
    latent: no VAE round trip between rounds)."""
    if method not in DRIFT_METHODS:
        raise ValueError(f"method must be one of {DRIFT_METHODS}, got {method!r}")
    start = make_task(seed, "recolor")
    scene, shape = start.scenes[0], start.focus[0]
    colours = (start.focus[1].colour, shape.colour)
    w, h = scene.size
    keep = np.ones((h, w), dtype=bool)
    for s in (shape, start.focus[1]):
        keep &= coverage(s, scene.size) == 0
    original = render(scene)
    image, latent, rows = original, None, []
    for round_ in range(DRIFT_ROUNDS):
        task, shape_next = _recolor_round(scene, shape, colours[round_ % 2])
        if method == "latent":
            reference = pipe.encode_images([image])[0] if latent is None else latent
            txt, y = pipe.text_encoder.encode([task.instruction])
            latent = sample(pipe.transformer, get_noise(1, h, w, round_), txt, y, references=[reference], steps=steps)
            out = pipe.decode(latent)[0]
        else:
            out = pipe.edit(image, task.instruction, seed=round_, steps=steps)
            if method == "recomposite":
                out = recomposite(image, out)
        rows.append(
            {
                "round": round_ + 1,
                "psnr_unedited_vs_original_db": round(psnr(out, original, keep), 2),
                "success": judge(task, out).success,
            }
        )
        image, scene, shape = out, task.target_scene, shape_next
    return rows


def compare_variant(
    exact_outputs: list[Image.Image], tasks: list[EditTask], make: Callable[[], KontextPipeline], **opts
) -> dict:
    """The variant `make` builds, run on `tasks` with `opts`: its success and how near its outputs are to the
    exact path's."""
    pipe = make()
    table, outputs = evaluate(pipe, tasks, **opts)
    close = [psnr(a, b) for a, b in zip(outputs, exact_outputs)]
    return {
        "single_edit_success": table["single_edits"]["success"],
        "success_by_kind": {k: v["success"] for k, v in table.items()},
        "psnr_to_exact_mean_db": _mean(close) if _mean(close) is not None else math.inf,
        "psnr_to_exact_min_db": round(min(close), 2),
        "identical_outputs": sum(math.isinf(c) for c in close),
    }


def markdown(report: dict) -> str:
    """The report as the tables of benchmarks/RESULTS.md."""

    def cell(value) -> str:
        return "–" if value is None else f"{value:.0%}" if isinstance(value, float) and value <= 1 else str(value)

    lines = [
        "| kind | tasks | success | success on held-out combinations | PSNR to truth (dB) | "
        "PSNR unedited (dB, mean / min) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in report["exact"].items():
        if kind == "single_edits":
            continue
        lines.append(
            f"| {kind} | {row['tasks']} | {cell(row['success'])} | "
            f"{cell(row['success_held_out_combinations'])} | {row['psnr_target_db']} | "
            f"{row['psnr_unedited_db'] or '–'} / {row['psnr_unedited_min_db'] or '–'} |"
        )
    single = report["exact"]["single_edits"]
    lines.append(
        f"| **single edits** | {single['tasks']} | **{cell(single['success'])}** | | | {single['psnr_unedited_db']} |"
    )
    if "vae_round_trip" in report:
        ceiling = report["vae_round_trip"]
        kinds = [k for k in ceiling if k != "single_edits"]
        lines += [
            "",
            "| the truth through the VAE | " + " | ".join(kinds) + " | **single edits** |",
            "|---" * (len(kinds) + 2) + "|",
            "| success | "
            + " | ".join(cell(ceiling[k]["success"]) for k in kinds)
            + f" | **{cell(ceiling['single_edits']['success'])}** |",
            "| PSNR unedited (dB) | "
            + " | ".join(str(ceiling[k]["psnr_unedited_db"] or "–") for k in kinds)
            + f" | **{ceiling['single_edits']['psnr_unedited_db']}** |",
        ]
    variants = [k for k in ("fp8_weights", "fast_k2", "fast_k4", "guidance_1") if k in report]
    if variants:
        lines += [
            "",
            "| path | single-edit success | PSNR to the exact path's output (dB, mean / min) | outputs identical |",
            "|---|---|---|---|",
        ]
        lines.append(f"| exact (fp32) | {cell(single['success'])} | – | – |")
        for name in variants:
            v = report[name]
            lines.append(
                f"| {name} | {cell(v['single_edit_success'])} | {v['psnr_to_exact_mean_db']} / "
                f"{v['psnr_to_exact_min_db']} | {v['identical_outputs']} |"
            )
    if report.get("drift"):
        methods = list(report["drift"])
        lines += ["", "| round | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for r in range(DRIFT_ROUNDS):
            row = [
                f"{report['drift'][m][r]['psnr_unedited_vs_original_db']} ({report['drift'][m][r]['success']:.0%})"
                for m in methods
            ]
            lines.append(f"| {r + 1} | " + " | ".join(row) + " |")
    return "\n".join(lines)


VARIANTS = ("exact", "vae", "fp8", "fast2", "fast4", "guidance1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=at_least(1), default=20, help="held-out tasks per kind")
    parser.add_argument("--steps", type=at_least(1), default=28)
    parser.add_argument("--drift-scenes", type=at_least(0), default=5)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="what to measure beside the exact path (which always runs), comma-separated",
    )
    parser.add_argument("--weights", type=Path, default=small_model_files().vae.parent)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=HELD_OUT_SEED,
        help=f"first task seed; below {HELD_OUT_SEED:,} the tasks are training tasks (the gap to "
        "held-out ones measures overfitting); drift always runs on held-out scenes",
    )
    args = parser.parse_args(argv)
    last_seed = args.first_seed + args.per_kind * len(KINDS) - 1
    if args.first_seed < 0 or args.first_seed < HELD_OUT_SEED <= last_seed:
        parser.error(
            f"--first-seed {args.first_seed} with --per-kind {args.per_kind} judges seeds up to {last_seed:,}: "
            f"expected all of them below {HELD_OUT_SEED:,} (training tasks) or none, and none negative"
        )
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; expected names from {', '.join(VARIANTS)}")
    torch.set_grad_enabled(False)
    started = time.time()
    pipe = load_default_pipeline(folder=args.weights)
    tasks = benchmark_tasks(args.per_kind, args.first_seed)
    report: dict = {
        "per_kind": args.per_kind,
        "first_seed": args.first_seed,
        "steps": args.steps,
        "torch": torch.__version__,
    }
    table, exact_outputs = evaluate(pipe, tasks, steps=args.steps)
    report["exact"] = table
    print(json.dumps(table, indent=1), flush=True)
    if "vae" in variants:
        report["vae_round_trip"] = tabulate(tasks, vae_round_trips(pipe, tasks))
        print("VAE round trip of the truth", json.dumps(report["vae_round_trip"]), flush=True)
    weights = small_model_files(args.weights).transformer
    if "fp8" in variants and stored_fp8_dtype(weights) is not None:
        # quantizing fp8 weights again returns them unchanged: the comparison would be exact by construction
        print(
            f"fp8: skipped, {weights} is stored in fp8 already; run --weights on its full-precision folder "
            "to measure what fp8 costs",
            flush=True,
        )
    elif "fp8" in variants:

        def fp8() -> KontextPipeline:
            transformer = load_transformer(weights, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
            fp8_pipe = KontextPipeline(transformer, pipe.vae, pipe.text_encoder)
            fp8_pipe.default_resize = pipe.default_resize
            return fp8_pipe

        report["fp8_weights"] = compare_variant(exact_outputs, tasks, fp8, steps=args.steps)
        print("fp8", report["fp8_weights"], flush=True)
    for k in (2, 4):
        if f"fast{k}" in variants:
            report[f"fast_k{k}"] = compare_variant(
                exact_outputs, tasks, lambda: pipe, steps=args.steps, reference_cache_every=k
            )
            print(f"fast{k}", report[f"fast_k{k}"], flush=True)
    if "guidance1" in variants:
        report["guidance_1"] = compare_variant(exact_outputs, tasks, lambda: pipe, steps=args.steps, guidance=1.0)
        print("guidance 1", report["guidance_1"], flush=True)
    report["drift"] = {}
    for method in DRIFT_METHODS:
        curves = [drift(pipe, HELD_OUT_SEED + 7 * i, method, args.steps) for i in range(args.drift_scenes)]
        if not curves:
            break
        report["drift"][method] = [
            {
                "round": r + 1,
                "psnr_unedited_vs_original_db": _mean([c[r]["psnr_unedited_vs_original_db"] for c in curves]),
                "success": round(statistics.fmean(c[r]["success"] for c in curves), 2),
            }
            for r in range(DRIFT_ROUNDS)
        ]
        print(method, [row["psnr_unedited_vs_original_db"] for row in report["drift"][method]], flush=True)
    report["seconds"] = round(time.time() - started)
    if args.json:
        with written_whole(args.json) as partial:
            partial.write_text(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    main()
