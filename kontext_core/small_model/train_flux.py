"""Training the small Kontext transformer with its T5 and CLIP towers, on the synthetic edit tasks.

    python -m kontext_core.small_model.train_flux --vae kontext_core/small_model/weights/ae-small.safetensors \
        --minutes 45 --out run/
    python -m kontext_core.small_model.store_fp8 run/flux1-kontext-small.safetensors \
        kontext_core/small_model/weights/flux1-kontext-small.safetensors

Training saves the transformer in fp16 (resuming needs its low bits); the shipped shape is 8 MiB so, and
`store_fp8` writes it for the package in scaled fp8 (4.2 MiB), beside the T5, CLIP and tokenizers saved in `run/`.

On a GPU add `--device cuda --workers 16 --no-cache` and a larger `--batch` (and `--tasks`): the tasks are
rendered in that many processes, encoded and kept on the GPU, and the model trains there in fp32 with TF32
matrix products.

The objective is the rectified flow the sampler integrates (`sampling.sample`): x_t = t·noise + (1 − t)·x0,
the model predicts noise − x0, with the references appended as clean context tokens at the position ids the
sampler gives them ("offset") and t drawn where the sampler's shifted schedule spends its steps. One prompt in
ten is dropped to "" so the model also learns the unconditional flow. An optional second phase distils
classifier-free guidance into the guidance embedding: the student, told guidance g, learns the teacher's
v_uncond + g·(v_cond − v_uncond). Tasks are drawn uniformly over the training set unless `--kind-weights` draws
some kinds more or less often.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import filecmp
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPTextModel, T5EncoderModel

from kontext_core.cli.options import at_least, positive
from kontext_core.files import written_whole
from kontext_core.model.flux import Flux
from kontext_core.sampling import get_lin_function, pack, position_ids, reference_tokens, time_shift
from kontext_core.checkpoints.tokenizers import load_tokenizer
from kontext_core.synthetic.tasks import KINDS
from kontext_core.small_model import SMALL_FLUX, SMALL_T5_LENGTH, SmallModelFiles, small_model_files
from kontext_core.small_model.data import check_training_seeds, draw_batches
from kontext_core.small_model.tokenizers import CLIP_LENGTH, write_clip_tokenizer, write_t5_tokenizer
from kontext_core.small_model.prepared import TaskGroup, prepare, prepared_cache
from kontext_core.small_model.architecture import deepen, small_clip, small_t5, zero_init_outputs

PROMPT_DROPOUT = 0.1
GUIDANCE_RANGE = (1.0, 4.0)
EMA_DECAY = 0.999


def parse_kind_weights(text: str) -> dict[str, float]:
    """The `--kind-weights` text "move=3,background=2" as {"move": 3.0, "background": 2.0}; others keep 1."""
    weights = {}
    for item in filter(None, text.split(",")):
        kind, _, value = item.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"--kind-weights: {kind!r} is not a task kind; expected one of {KINDS}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--kind-weights: {item!r} needs a number after '='") from None
        if not math.isfinite(weights[kind]) or weights[kind] < 0:
            raise argparse.ArgumentTypeError(f"--kind-weights: the weight of {kind!r} must be a finite number >= 0")
    return weights


def parse_blocks(text: str) -> tuple[int, int]:
    """The `--blocks` text "2,6" as (2, 6): double-stream, then single-stream blocks."""
    try:
        double, single = (int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two counts 'DOUBLE,SINGLE' such as 2,6, got {text!r}") from None
    if double < 1 or single < 1:
        raise argparse.ArgumentTypeError(f"both counts must be at least 1, got {text!r}")
    return double, single


def batches(
    groups: list[TaskGroup], batch: int, generator: torch.Generator, kind_weights: dict[str, float] | None = None
) -> Iterator[tuple[TaskGroup, Tensor]]:
    """Endless batches of one task group; with `kind_weights`, tasks of a kind drawn that much more often."""
    row_weights = None
    if kind_weights:
        per_kind = torch.tensor([kind_weights.get(kind, 1.0) for kind in KINDS], dtype=torch.float64)
        row_weights = [per_kind[g.kinds] for g in groups]
        if not any(w.sum() > 0 for w in row_weights):
            raise ValueError("--kind-weights leaves no task to train on")
    for group, rows in draw_batches([len(g.targets) for g in groups], batch, generator, row_weights):
        yield groups[group], rows


def sample_sigmas(batch: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """Logit-normal t, shifted as `get_schedule` shifts for this image size (the steps the sampler takes)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))
    return time_shift(get_lin_function()(seq_len), 1.0, t)


class Student(nn.Module):
    def __init__(self, flux: Flux, t5: T5EncoderModel, clip: CLIPTextModel):
        super().__init__()
        self.flux, self.t5, self.clip = flux, t5, clip
        # No dropout: the 2 + 6-block model's held-out and training losses agreed on 24k tasks; the gap the larger
        # model showed on training tasks narrowed with more tasks (`--tasks`), dropout was not tried.
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    def forward(
        self, group: TaskGroup, idx: Tensor, x_t: Tensor, t: Tensor, guidance: Tensor, t5_ids: Tensor, clip_ids: Tensor
    ) -> Tensor:
        """Velocity of the target tokens for packed noisy targets `x_t`, as `sampling.sample` computes it."""
        batch, (lat_h, lat_w) = len(idx), group.targets.shape[-2:]
        txt = self.t5(input_ids=t5_ids).last_hidden_state
        y = self.clip(input_ids=clip_ids).pooler_output
        img, img_ids = x_t, position_ids(lat_h // 2, lat_w // 2)
        if group.references:
            ref_tok, ref_ids = reference_tokens([r[idx] for r in group.references], (lat_h, lat_w), "offset")
            img, img_ids = torch.cat((img, ref_tok), dim=1), torch.cat((img_ids, ref_ids), dim=0)
        img_ids = img_ids.to(x_t.device)[None].expand(batch, -1, -1)  # moved before expanding: N×3, not B×N×3
        txt_ids = torch.zeros(batch, txt.shape[1], 3, device=x_t.device)
        return self.flux(img, img_ids, txt, txt_ids, t, y, guidance)[:, : x_t.shape[1]]


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":  # TF32 matmuls: the model stays fp32 (no autocast), the matrix units still work
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    generator = torch.Generator().manual_seed(args.seed)  # task draws, on the CPU
    out = args.out
    files = small_model_files(out)
    t5_tok = load_tokenizer(write_t5_tokenizer(files.t5_tokenizer), "t5")
    clip_tok = load_tokenizer(write_clip_tokenizer(files.clip_tokenizer), "clip")
    if not files.vae.exists():  # the VAE it trains against, beside the model: `out` loads as a whole
        with written_whole(files.vae) as partial:
            shutil.copyfile(args.vae, partial)
    start = time.time()
    cache = prepared_cache(args.vae, args.first_task, args.tasks) if args.cache else None
    if cache is not None and cache.exists():
        groups = [TaskGroup(**g) for g in torch.load(cache)]
        origin = f"read from {cache}"
    else:
        groups = prepare(args.vae, args.tasks, t5_tok, clip_tok, device, args.workers, args.first_task)
        origin = "encoded"
        if cache is not None:
            with written_whole(cache) as partial:  # a truncated cache would be read by the next run
                torch.save([dataclasses.asdict(g) for g in groups], partial)
            origin += f", cached in {cache}"
    print(
        f"prepared {args.tasks} tasks from seed {args.first_task} in {len(groups)} shape groups ({origin}), "
        f"{time.time() - start:.0f}s",
        flush=True,
    )
    if args.prepare_only:
        return
    noise_generator = torch.Generator(device).manual_seed(args.seed)  # noise, t, guidance, prompt dropout
    groups = [TaskGroup(**{k: _to(v, device) for k, v in dataclasses.asdict(g).items()}) for g in groups]
    empty_t5 = t5_tok([""], padding="max_length", max_length=SMALL_T5_LENGTH, return_tensors="pt").input_ids.to(device)
    empty_clip = clip_tok([""], padding="max_length", max_length=CLIP_LENGTH, return_tensors="pt").input_ids.to(device)

    if args.resume is None:
        double, single = args.blocks or (SMALL_FLUX.depth, SMALL_FLUX.depth_single_blocks)
        shape = dataclasses.replace(SMALL_FLUX, depth=double, depth_single_blocks=single)
        student = Student(
            zero_init_outputs(Flux(shape)), small_t5(len(t5_tok)), small_clip(len(clip_tok), clip_tok.eos_token_id)
        )
    else:
        student = resume(args.resume)
    if args.deepen:
        student.flux = deepen(student.flux)
    student.to(device)
    print(
        f"transformer: {student.flux.params.depth} double + {student.flux.params.depth_single_blocks} single blocks, "
        f"{sum(p.numel() for p in student.flux.parameters()) / 1e6:.2f} M parameters",
        flush=True,
    )
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), fused=device.type == "cuda"
    )
    deadline = start + 60 * args.minutes
    distill_from = deadline - 60 * args.distill_minutes
    teacher = None
    step, loss_avg, info = 0, None, {}

    def smoothed_loss() -> float | None:
        return None if loss_avg is None else float(loss_avg)

    stream = batches(groups, args.batch, generator, args.kind_weights)
    while time.time() < deadline and step < args.max_steps:
        progress = min((time.time() - start) / (60 * args.minutes), 1.0)
        for pg in optimizer.param_groups:
            pg["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        if teacher is None and args.distill_minutes > 0 and time.time() >= distill_from:
            teacher = copy.deepcopy(ema).requires_grad_(False)
            info["flow_steps"] = step
            # the undistilled model is kept beside, to compare (benchmarks/quality.py --weights)
            undistilled = small_model_files(out / "undistilled")
            undistilled.transformer.parent.mkdir(parents=True, exist_ok=True)
            save(ema, undistilled, {**info, "loss": smoothed_loss(), "seconds": round(time.time() - start)})
            shutil.copy(args.vae, undistilled.vae)
            for folder in ("t5_tokenizer", "clip_tokenizer"):
                shutil.copytree(getattr(files, folder), getattr(undistilled, folder), dirs_exist_ok=True)
            print(f"step {step}: distilling guidance from here", flush=True)
        group, idx = next(stream)
        batch, idx = len(idx), idx.to(device)
        x0 = pack(group.targets[idx])
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        t = sample_sigmas(batch, x0.shape[1], noise_generator)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        t5_ids, clip_ids = group.t5_ids[idx].clone(), group.clip_ids[idx].clone()
        guidance = torch.empty(batch, device=device).uniform_(*GUIDANCE_RANGE, generator=noise_generator)
        if teacher is None:
            drop = torch.rand(batch, generator=noise_generator, device=device) < PROMPT_DROPOUT
            t5_ids[drop], clip_ids[drop] = empty_t5, empty_clip
            target = noise - x0
        else:
            with torch.no_grad():
                ones = torch.ones(batch, device=device)
                v_cond = teacher(group, idx, x_t, t, ones, t5_ids, clip_ids)
                v_uncond = teacher(group, idx, x_t, t, ones, empty_t5.expand(batch, -1), empty_clip.expand(batch, -1))
            target = v_uncond + guidance[:, None, None] * (v_cond - v_uncond)
        pred = student(group, idx, x_t, t, guidance, t5_ids, clip_ids)
        loss = (pred - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), student.parameters()):
                e.lerp_(p, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        # kept on the device: reading the loss every step would make the CPU wait for the GPU
        loss_avg = loss.detach() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.detach()
        step += 1
        if step % 200 == 0:
            print(
                f"step {step} loss {float(loss_avg):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
        if step % args.save_every == 0:
            save(ema, files, {**info, "steps": step, "loss": smoothed_loss(), "seconds": round(time.time() - start)})
    info.update(
        steps=step,
        loss=smoothed_loss(),
        seconds=round(time.time() - start),
        tasks=args.tasks,
        first_task=args.first_task,
        batch=args.batch,
        lr=args.lr,
        distill_minutes=args.distill_minutes,
        kind_weights=args.kind_weights,
    )
    save(ema, files, info)
    print(f"done: {json.dumps(info)}", flush=True)


def _to(value: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    return [v.to(device) for v in value] if isinstance(value, list) else value.to(device)


def resume(folder: Path) -> Student:
    """A saved model (the EMA weights, in fp32 again) to train on."""
    from kontext_core.checkpoints.text_encoders import load_clip, load_t5
    from kontext_core.checkpoints.transformer import load_transformer

    files = small_model_files(folder)
    student = Student(
        load_transformer(files.transformer, dtype=torch.float32),
        load_t5(files.t5, dtype=torch.float32),
        load_clip(files.clip, dtype=torch.float32),
    )
    return student.train().requires_grad_(True)


def save(model: Student, files: SmallModelFiles, info: dict) -> None:
    """The EMA weights in the real layouts: BFL keys (fp16, the config in `flux_params`), ComfyUI-style T5 and
    CLIP singles with their Hugging Face config."""
    training = json.dumps(info)
    flux = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.flux.state_dict().items()}
    meta = {"flux_params": json.dumps(dataclasses.asdict(model.flux.params)), "training": training}
    t5 = {
        k: v.detach().cpu().contiguous() for k, v in model.t5.state_dict().items() if k != "encoder.embed_tokens.weight"
    }
    # ComfyUI's clip_l layout: the tower under `text_model.` (transformers 5 no longer nests it)
    clip = {
        f"text_model.{k.removeprefix('text_model.')}": v.detach().cpu().contiguous()
        for k, v in model.clip.state_dict().items()
    }
    # all three written before any is renamed: a run stopped mid-save keeps its previous checkpoint whole
    with written_whole(files.transformer) as f, written_whole(files.t5) as t, written_whole(files.clip) as c:
        save_file(flux, f, metadata=meta)
        save_file(t5, t, metadata={"config": model.t5.config.to_json_string(), "training": training})
        save_file(clip, c, metadata={"config": model.clip.config.to_json_string(), "training": training})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, default=small_model_files().vae)
    parser.add_argument(
        "--minutes",
        type=positive,
        default=45.0,
        help="wall-clock budget, distillation included, and encoding the tasks when not cached",
    )
    parser.add_argument("--distill-minutes", type=float, default=0.0, help="last part spent distilling guidance")
    parser.add_argument(
        "--kind-weights",
        type=parse_kind_weights,
        default={},
        help="draw tasks of these kinds more or less often, e.g. move=3,background=2 (others 1)",
    )
    parser.add_argument("--tasks", type=at_least(1), default=24000)
    parser.add_argument(
        "--first-task",
        type=int,
        default=0,
        help="train on the tasks from this seed on (e.g. tasks a resumed model has not seen)",
    )
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--lr", type=positive, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=at_least(1), default=1000)
    parser.add_argument("--max-steps", type=at_least(1), default=10**9, help="stop earlier than --minutes (smoke runs)")
    parser.add_argument("--prepare-only", action="store_true", help="encode the tasks into the cache and stop")
    parser.add_argument("--resume", type=Path, help="a folder of saved small-model files to continue training")
    parser.add_argument(
        "--deepen",
        action="store_true",
        help="double the resumed transformer's blocks (each "
        "followed by a copy that starts as the identity) before training on",
    )
    parser.add_argument(
        "--blocks",
        type=parse_blocks,
        help="a new model's double- and single-stream block counts, e.g. 2,6 "
        f"(default the shipped {SMALL_FLUX.depth},{SMALL_FLUX.depth_single_blocks}); a resumed model keeps its own",
    )
    # Required: a run saves every --save-every steps, and the package's own folder must never be the default.
    parser.add_argument("--out", type=Path, required=True, help="the folder the trained files are saved in")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=at_least(1), default=1, help="processes rendering the tasks")
    parser.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the encoded tasks in the temp folder for the next run on the same tasks, VAE and code",
    )
    args = parser.parse_args(argv)
    if args.blocks is not None and args.resume is not None:
        parser.error("--blocks sets the depth of a new model; a --resume'd one keeps its own (--deepen doubles it)")
    if not 0 <= args.distill_minutes <= args.minutes:  # equal: a run that only distils a resumed model
        parser.error(f"--distill-minutes must lie in [0, --minutes {args.minutes}], got {args.distill_minutes}")
    try:  # checked here, not when the first chunk renders minutes later
        check_training_seeds(args.first_task, args.tasks)
    except ValueError as e:
        parser.error(f"--first-task {args.first_task} with --tasks {args.tasks}: {e}")
    out_vae = small_model_files(args.out).vae
    if out_vae.exists() and args.vae.exists() and not filecmp.cmp(out_vae, args.vae, shallow=False):
        parser.error(
            f"--out {args.out} holds another {out_vae.name} than --vae {args.vae}; "
            "train into a new folder, or pass that VAE as --vae"
        )
    train(args)


if __name__ == "__main__":
    main()
