"""One rank of a test's process group (`python -m tests.helpers.parallel_worker MODE ARG`).

`checks OUTDIR`: every split of a tiny model's forward and sampling against the same model in this one process,
written as relative errors to OUTDIR/rank<R>.json. `fail TIMEOUT`: a split run whose rank 1 raises.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from benchmarks.parallel import CollectiveMeter
from kontext_core.model.flux import Flux
from kontext_core.parallel import ParallelConfig, ParallelFlux, StopRequested, init_from_environment
from kontext_core.parallel.groups import split
from kontext_core.sampling import pack, position_ids, reference_tokens, sample
from tests.helpers.flux_files import scaled_fp8_file
from tests.helpers.tiny_files import write_lora
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

# 3 heads of 16: no group of 2 or 4 ranks divides them, so Ulysses refuses and ring must do
THREE_HEADS = dataclasses.replace(TINY_FLUX, hidden_size=48, num_heads=3)
INJECTED = "injected failure on rank 1"


class Interrupted(Exception):
    """What rank 0's callback raises to stop a run, as ComfyUI's interruption does."""


def edit_inputs(params, method: str = "offset", batch: int = 2, seed: int = 1):
    """A non-square target (6×10 tokens), two references of other shapes (8×4, 5×3), 7 text tokens: no token
    count a multiple of 2 or 4, so every segment is padded."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, 16, 12, 20, generator=gen)
    references = [torch.randn(1, 16, 16, 8, generator=gen), torch.randn(1, 16, 10, 6, generator=gen)]
    ref_tok, ref_ids = reference_tokens(references, (12, 20), method)
    img = torch.cat((pack(target), ref_tok.expand(batch, -1, -1)), dim=1)
    img_ids = torch.cat((position_ids(6, 10), ref_ids))[None].expand(batch, -1, -1)
    txt = torch.randn(batch, 7, params.context_in_dim, generator=gen)
    y = torch.randn(batch, params.vec_in_dim, generator=gen)
    forward = (img, img_ids, txt, torch.zeros(batch, 7, 3), torch.tensor([0.83, 0.27]), y, torch.tensor([2.5, 4.0]))
    return forward, target, references


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def forward_errors(model: Flux, split_model: ParallelFlux) -> dict[str, float]:
    inputs, _, _ = edit_inputs(model.params)
    errors = {"forward": relative(split_model(*inputs), model(*inputs))}
    # the fast mode: record the references' keys/values with them, then a step on the target tokens alone
    img, img_ids, *rest = inputs
    refs = img.shape[1] - 60
    outputs = []
    for m in (model, split_model):
        cache = m.new_reference_cache(refs)
        recorded = m(img, img_ids, *rest, ref_cache=cache)
        cache.set_recording(False)
        outputs.append((recorded, m(img[:, :60], img_ids[:, :60], *rest, ref_cache=cache)))
    errors["cache_record"] = relative(outputs[1][0], outputs[0][0])
    errors["cache_reuse"] = relative(outputs[1][1], outputs[0][1])
    return errors


def sampling_errors(model: Flux, split_model: ParallelFlux) -> dict[str, float]:
    errors = {}
    for method in ("offset", "index", "uxo"):
        (_, _, txt, _, _, y, _), target, references = edit_inputs(model.params, method)
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(7))
        runs = {
            method: {"reference_method": method},
            f"{method}_cache": {"reference_method": method, "reference_cache_every": 2},
            f"{method}_denoise": {"reference_method": method, "denoise": 0.5, "init_latent": target},
        }
        for name, fields in runs.items():
            one, split_run = (
                sample(m, noise, txt, y, steps=3, references=references, **fields) for m in (model, split_model)
            )
            errors[f"sample_{name}"] = relative(split_run, one)
    return errors


def cfg_error(model: Flux, split_model: ParallelFlux) -> float:
    (_, _, txt, _, _, y, _), target, references = edit_inputs(model.params)
    negative = (txt.flip(1), y.flip(0))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(8))
    one, split_run = (
        sample(m, noise, txt, y, steps=3, references=references, negative=negative, true_cfg_scale=3.0)
        for m in (model, split_model)
    )
    return relative(split_run, one)


def callback_report(model: Flux, plan) -> dict:
    """How many steps rank 0's callback saw (the others: none), and how each rank stopped when it raised."""
    (_, _, txt, _, _, y, _), target, references = edit_inputs(model.params)

    def run(callback) -> None:
        sample(ParallelFlux(model, plan), target, txt, y, steps=3, references=references, callback=callback)

    seen = []
    run(plan.step_callback(seen.append))

    def interrupt(info) -> None:
        if info.step == 2:
            raise Interrupted("stopped at step 2")

    try:
        run(plan.step_callback(interrupt))
        stop = "not stopped"
    except (Interrupted, StopRequested) as e:
        stop = type(e).__name__
    return {"callback_steps": [info.step for info in seen], "stop": stop}


def lora_fp8_model(folder: Path, rank: int) -> Flux:
    """The tiny model with a LoRA attached and its block Linears in scaled fp8 (kept fp8 in memory)."""
    from kontext_core.checkpoints.transformer import load_transformer
    from kontext_core.runtime.lora import apply_lora

    path, _ = scaled_fp8_file(tiny_flux_model(1), folder / f"rank{rank}-fp8.safetensors", "scale_weight")
    model = load_transformer(path, dtype=torch.float32, keep_fp8=True).eval()
    write_lora(folder / f"rank{rank}-lora.safetensors")
    apply_lora(model, folder / f"rank{rank}-lora.safetensors", 0.8)
    return model


@torch.no_grad()
def run_checks(out: Path) -> None:
    plan = init_from_environment(ParallelConfig("ulysses", timeout_s=60))
    world, rank = plan.world_size, plan.rank
    ring = split(ParallelConfig("ring"), plan.device)
    cfg_methods = ["cfg"] if world == 2 else ["cfg+ulysses", "cfg+ring"]
    cfg_plans = {m: split(ParallelConfig(m), plan.device) for m in cfg_methods}
    model = tiny_flux_model(3)
    report: dict = {"errors": {}}
    report["bytes_sent"] = {}
    for name, p in (("ulysses", plan), ("ring", ring)):
        with CollectiveMeter() as meter:
            ParallelFlux(model, p)(*edit_inputs(model.params)[0])
        report["bytes_sent"][name] = meter.bytes_sent
        for check, error in (
            forward_errors(model, ParallelFlux(model, p)) | sampling_errors(model, ParallelFlux(model, p))
        ).items():
            report["errors"][f"{name}_{check}"] = error
    for name, p in cfg_plans.items():
        report["errors"][f"{name}_sample"] = cfg_error(model, ParallelFlux(model, p))
    three = tiny_flux_model(4, THREE_HEADS)
    report["errors"]["ring_three_heads_forward"] = forward_errors(three, ParallelFlux(three, ring))["forward"]
    try:
        ParallelFlux(three, plan)
        report["ulysses_three_heads"] = "accepted"
    except ValueError as e:
        report["ulysses_three_heads"] = str(e)
    patched = lora_fp8_model(out, rank)
    report["errors"]["ulysses_lora_fp8_forward"] = forward_errors(patched, ParallelFlux(patched, plan))["forward"]
    report |= callback_report(model, plan)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    plan.close()


@torch.no_grad()
def run_failing(timeout_s: float) -> None:
    """A split sampling run whose rank 1 raises at its second forward, the others waiting on it in attention."""
    plan = init_from_environment(ParallelConfig("ulysses", timeout_s=timeout_s))
    model = tiny_flux_model(3)
    if plan.rank == 1:
        forward, calls = model.transform, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise ValueError(INJECTED)
            return forward(*args, **kwargs)

        model.transform = failing
    (_, _, txt, _, _, y, _), target, references = edit_inputs(model.params)
    try:
        sample(ParallelFlux(model, plan), target, txt, y, steps=3, references=references)
    finally:
        plan.close()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "checks":
        run_checks(Path(rest[0]))
    elif mode == "fail":
        run_failing(float(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: checks or fail")
