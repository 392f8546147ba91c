"""Command line: `python -m kontext_core demo|edit|generate|inspect|fetch ...`.

With no FLUX.1 Kontext [dev] files configured (no paths, no ComfyUI folder, nothing in the Hugging Face
cache), `edit` and `generate` run the built-in small model and say so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kontext_core.cli.options import at_least, lora_option
from kontext_core.files import written_whole
from kontext_core.policy.provenance import ProvenanceError
from kontext_core.runtime.quant import WEIGHT_DTYPES, weight_options
from kontext_core.policy.safety import (
    DEFAULT_TOLERANCE,
    MAX_TOLERANCE,
    MIN_TOLERANCE,
    TOLERANCE_HELP,
    SafetyUnavailableError,
)
from kontext_core.synthetic.tasks import HELD_OUT_SEED, KINDS, make_task

if TYPE_CHECKING:  # the pipeline's imports load only when a command needs them
    from kontext_core.pipeline import KontextPipeline

DEMO_SEED = HELD_OUT_SEED  # the first held-out task: a recolour of a held-out (colour, shape, place)
EXIT_BLOCKED = 3  # the safety checks refused the prompt, an input image or an output: not a usage error (2)
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (explicit paths, or found in <ComfyUI>/models)")
    g.add_argument("--comfyui", help="a ComfyUI folder whose models/ (and tokenizers) to use; default $COMFYUI_ROOT")
    g.add_argument(
        "--transformer", help="FLUX.1 Kontext transformer: .safetensors file or diffusers transformer/ folder"
    )
    g.add_argument("--vae", help="ae.safetensors or a diffusers vae/ folder")
    g.add_argument("--t5", help="T5-XXL encoder: t5xxl_*.safetensors or a diffusers text_encoder_2/ folder")
    g.add_argument("--clip", help="CLIP-L: clip_l.safetensors or a diffusers text_encoder/ folder")
    g.add_argument("--t5-tokenizer", help="folder with the T5 tokenizer (Hugging Face format)")
    g.add_argument("--clip-tokenizer", help="folder with the CLIP tokenizer (Hugging Face format)")
    g.add_argument(
        "--t5-max-length",
        type=int,
        help="T5 pad length: 512 (BFL/diffusers) or 256 (ComfyUI); default: the tokenizer's own (512 for T5-XXL)",
    )
    g.add_argument(
        "--small-model",
        action="store_true",
        help="use the built-in small model (synthetic scenes of shapes) even if real files are found",
    )
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument(
        "--dtype", choices=list(DTYPES), default="auto", help="compute precision (auto: bf16 on CUDA, fp32 on CPU)"
    )
    g.add_argument(
        "--weight-dtype",
        choices=list(WEIGHT_DTYPES),
        default="default",
        help="transformer weights in memory: default keeps the file's (an fp8 file stays fp8); "
        "an fp8 type casts a 16-bit file's block weights to it, halving their memory",
    )
    g.add_argument("--attention", default="auto", help="attention kernel: auto, sdpa, flash, sage")
    g.add_argument(
        "--lora",
        action="append",
        type=lora_option,
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a FLUX LoRA (.safetensors) added to the transformer, at STRENGTH (default 1.0); repeat for several",
    )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", help="enables true CFG together with --true-cfg-scale > 1")
    p.add_argument("--true-cfg-scale", type=float, default=1.0)
    p.add_argument("--steps", type=at_least(1), default=28)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=at_least(1), default=1)
    p.add_argument("--out", required=True, help="output PNG; with several images, _1, _2 … are appended")


def _add_safety_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "safety checks (the FLUX.1 [dev] licence asks for content filtering or review of outputs)",
        "The prompt is checked before any model loads; with the image classifier installed (the "
        "safety extra), each --image before sampling and each result before it is written. What "
        "is blocked is named and not written (exit status 3).",
    )
    g.add_argument(
        "--safety-tolerance",
        type=int,
        choices=range(MIN_TOLERANCE, MAX_TOLERANCE + 1),
        default=DEFAULT_TOLERANCE,
        metavar="{0..6}",
        help=TOLERANCE_HELP,
    )
    g.add_argument(
        "--no-safety-check",
        action="store_true",
        help="check neither the prompt nor the images (then review the outputs yourself)",
    )


class SafetyBlocked(Exception):
    """An input or output the safety checks refused."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kontext_core", description=__doc__)
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on a bad input or a missing file, raise the error with its traceback (for a bug report) "
        "instead of printing its message",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit one or more reference images following a prompt")
    edit.add_argument("--image", action="append", required=True, help="reference image; repeat for several")
    edit.add_argument("--width", type=at_least(16), help="default: the first reference's (after --resize)")
    edit.add_argument("--height", type=at_least(16), help="default: the first reference's (after --resize)")
    edit.add_argument(
        "--resize",
        choices=["stretch", "crop", "keep"],
        help="reference sizing; default stretch (real model) or keep (small model)",
    )
    edit.add_argument("--reference-method", choices=["offset", "index", "uxo"], default="offset")
    edit.add_argument(
        "--fast",
        type=at_least(0),
        default=0,
        metavar="K",
        help="approximate fast mode: reuse reference K/V for K steps",
    )
    _add_sampling_options(edit)
    _add_safety_options(edit)
    _add_model_options(edit)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--width", type=at_least(16), help="default 1024 (real model) or 64 (small model)")
    gen.add_argument("--height", type=at_least(16), help="default 1024 (real model) or 64 (small model)")
    _add_sampling_options(gen)
    _add_safety_options(gen)
    _add_model_options(gen)

    demo = sub.add_parser(
        "demo", help="a held-out synthetic edit with the built-in small model: before/after/truth PNGs"
    )
    demo.add_argument("--out", default="kontext-demo", help="folder for before.png, after.png, truth.png")
    demo.add_argument("--seed", type=int, default=DEMO_SEED, help=f"task seed (held out from {HELD_OUT_SEED} up)")
    demo.add_argument("--kind", choices=KINDS, help="task kind (default: the seed's)")
    demo.add_argument("--steps", type=at_least(1), default=28, help="sampling steps (default 28)")

    inspect = sub.add_parser("inspect", help="tell what a model file is, without loading its tensors")
    inspect.add_argument("path")

    from kontext_core.tools.fetch import add_fetch_parser

    add_fetch_parser(sub)
    return parser


def _progress(total_label: str):
    start = time.perf_counter()

    def report(info) -> None:
        width = 30
        done = int(width * info.step / info.total)
        elapsed = time.perf_counter() - start
        sys.stderr.write(
            f"\r{total_label} [{'#' * done}{'.' * (width - done)}] {info.step}/{info.total} "
            f"{elapsed / info.step:.2f}s/step"
        )
        if info.step == info.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


REAL_MODEL_HINT = (
    "For real images pass --transformer/--vae/--t5/--clip or --comfyui, or download FLUX.1 Kontext [dev] with "
    "`python -m kontext_core fetch`."
)


def _wants_small_model(args: argparse.Namespace) -> bool:
    """The small model when asked for, or when no real model is configured anywhere (said on stderr)."""
    from kontext_core.tools.discovery import any_model_configured

    files = {"transformer": args.transformer, "vae": args.vae, "t5": args.t5, "clip": args.clip}
    tokenizers = (args.t5_tokenizer, args.clip_tokenizer)
    if args.small_model:
        real_only = {f"--{role}": path for role, path in files.items()} | {
            "--t5-tokenizer": args.t5_tokenizer,
            "--clip-tokenizer": args.clip_tokenizer,
            "--comfyui": args.comfyui,
            "--t5-max-length": args.t5_max_length,
            "--dtype": None if args.dtype == "auto" else args.dtype,
            "--weight-dtype": None if args.weight_dtype == "default" else args.weight_dtype,
        }
        given = [name for name, value in real_only.items() if value is not None]
        if given:
            raise ValueError(
                f"--small-model cannot be combined with {', '.join(given)}: options the built-in "
                "model does not use (it has its own files and runs in fp32)"
            )
        return True
    return not any(tokenizers) and not any_model_configured(**files, comfyui_root=args.comfyui)


def load_pipeline(args: argparse.Namespace, small: bool) -> tuple[KontextPipeline, str]:
    """The pipeline, and the name its images' provenance gives the model."""
    from kontext_core import load_text_encoder, load_transformer, load_vae
    from kontext_core.tools.discovery import resolve_model_files
    from kontext_core.pipeline import KontextPipeline
    from kontext_core.policy.provenance import model_name

    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device torch knows (cpu, cuda, cuda:1, mps …)") from None
    if small:
        from kontext_core.small_model import NOTICE, load_default_pipeline, small_model_files

        print(f"{NOTICE}. {REAL_MODEL_HINT}", file=sys.stderr)
        pipe = load_default_pipeline(device=args.device)
        pipe.transformer.attention_backend = args.attention
        return pipe, model_name(small_model_files().transformer.name, builtin=True)
    files = resolve_model_files(
        transformer=args.transformer, vae=args.vae, t5=args.t5, clip=args.clip, comfyui_root=args.comfyui
    )
    dtype = DTYPES[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    print(f"transformer: {files.transformer}\nvae: {files.vae}\nt5: {files.t5}\nclip: {files.clip}", file=sys.stderr)
    transformer = load_transformer(
        files.transformer, device=args.device, dtype=dtype, **weight_options(args.weight_dtype)
    )
    vae = load_vae(files.vae, device=args.device, dtype=dtype)
    text = load_text_encoder(
        t5=files.t5,
        clip=files.clip,
        t5_tokenizer=args.t5_tokenizer or files.t5_tokenizer,
        clip_tokenizer=args.clip_tokenizer or files.clip_tokenizer,
        t5_max_length=args.t5_max_length,
        device=args.device,
        dtype=dtype,
        comfyui_root=files.comfyui_root,
    )
    transformer.attention_backend = args.attention
    return KontextPipeline(transformer, vae, text), model_name(str(files.transformer))


def _add_loras(pipe: KontextPipeline, loras: list[tuple[str, float]], model: str) -> str:
    """Each `--lora` added to the transformer; the name provenance gives the model, with them."""
    from kontext_core.checkpoints.safetensors_io import CheckpointError
    from kontext_core.runtime.lora import apply_lora, unmatched_note
    from kontext_core.policy.provenance import with_loras

    applied = [(path, strength) for path, strength in loras if strength != 0]  # 0: nothing added, as ComfyUI's
    for path, strength in applied:
        try:
            result = apply_lora(pipe.transformer, path, strength)
        except CheckpointError as e:  # its message starts with the file
            raise ValueError(f"--lora {e}") from None
        if result.unmatched:
            print(f"note: --lora {path}: {unmatched_note(result.unmatched)}", file=sys.stderr)
    return with_loras(model, applied)


def _output_paths(out: str, count: int) -> list[Path]:
    """`out` for one image; `_1`, `_2` … appended to its name for several."""
    target = Path(out)
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{i + 1}{target.suffix}") for i in range(count)]


def _save(image, path: str | Path, made_by: dict | None = None) -> Path:
    """A PNG at `path`, written whole. A generated image (`made_by`: `model`, `instruction`, `parameters`,
    `inputs` for `provenance.save_png`) carries the AI disclosure, signed when KONTEXT_C2PA_* is set; inputs and
    truths are plain."""
    from kontext_core.policy import provenance

    path = Path(path)
    try:
        if made_by is not None:
            return provenance.save_png(image, path, signing=provenance.SigningConfig.from_env(), **made_by)
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            image.save(partial, format="PNG")
    except OSError as e:  # named by the path asked for, not by the temporary file the error may name
        raise ValueError(f"{path}: cannot be written ({e.strerror or e})") from e
    return path


def _refuse_bad_out(out: str, *, folder: bool = False) -> None:
    """Before any work: `--out` must be a PNG name (or, for `folder`, a folder) whose place can hold it."""
    path = Path(out)
    if not folder and path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the images are written as PNG; give a name ending in .png")
    try:
        if not folder and path.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name in it, such as {path / 'edited.png'}")
        if folder and path.exists() and not path.is_dir():
            raise ValueError(f"--out {out} is a file; the demo writes its images into a folder")
        for above in (path.parent, *path.parent.parents):
            if above.is_symlink() and not above.exists():
                raise ValueError(f"--out {out}: {above} is a link to nothing")
            if above.exists():
                if not above.is_dir():
                    raise ValueError(f"--out {out}: {above} is a file, not a folder")
                break
    except OSError as e:  # e.g. a folder on the way that may not be looked into
        raise ValueError(f"--out {out}: cannot be checked ({e.strerror or e})") from None


def _made_by(model: str, instruction: str, inputs: list, *, steps: int, seed: int, guidance: float) -> dict:
    """What `_save` records about a generated image (`provenance.save_png`'s keywords)."""
    return {
        "model": model,
        "instruction": instruction,
        "inputs": inputs,
        "parameters": f"seed {seed}, steps {steps}, guidance {guidance}",
    }


def run_demo(args: argparse.Namespace) -> int:
    """One held-out task: the small model's edit beside the input and the rendered truth, judged."""
    from kontext_core.policy.provenance import model_name
    from kontext_core.synthetic.judge import judge
    from kontext_core.small_model import load_default_pipeline, small_model_files

    _refuse_bad_out(args.out, folder=True)
    task = make_task(args.seed, args.kind)
    pipe = load_default_pipeline()
    print(f"task {task.kind} (seed {task.seed}): {task.instruction}", file=sys.stderr)
    settings = {"steps": args.steps, "seed": 0, "guidance": 2.5}  # the noise seed; --seed picks the task
    progress = _progress(task.kind)
    if task.kind == "text_to_image":
        after = pipe.generate(
            task.instruction, width=task.target.width, height=task.target.height, callback=progress, **settings
        )
    else:
        after = pipe.edit(task.images, task.instruction, callback=progress, **settings)
    out = Path(args.out)
    befores = [f"before{'' if i == 0 else f'_{i + 1}'}.png" for i in range(len(task.images))]
    for name, image in (*zip(befores, task.images), ("truth.png", task.target)):
        _save(image, out / name)
    model = model_name(small_model_files().transformer.name, builtin=True)
    _save(after, out / "after.png", _made_by(model, task.instruction, task.images, **settings))
    verdict = judge(task, after)
    unedited = "" if verdict.psnr_unedited is None else f", unedited pixels {verdict.psnr_unedited:.1f} dB"
    print(f"{'success' if verdict.success else 'FAILED'}: PSNR to the truth {verdict.psnr_target:.1f} dB{unedited}")
    print(f"wrote {', '.join(str(out / n) for n in (*befores, 'after.png', 'truth.png'))}")
    return 0 if verdict.success else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SafetyBlocked as e:
        print(f"python -m kontext_core {args.command}: blocked by the safety checks: {e}", file=sys.stderr)
        return EXIT_BLOCKED
    except SafetyUnavailableError as e:
        if args.traceback:
            raise
        print(
            f"python -m kontext_core {args.command}: error: {e} (or pass --no-safety-check, and review the "
            "outputs yourself)",
            file=sys.stderr,
        )
        return 2
    except (FileNotFoundError, ValueError, ProvenanceError) as e:  # ValueError includes CheckpointError
        # a missing file or a bad input (a seed, a size, a file of the wrong kind): its message, not a traceback,
        # unless asked for, since a genuine bug raising ValueError would look the same
        if args.traceback:
            raise
        print(f"python -m kontext_core {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from kontext_core.checkpoints.summary import describe

        print(describe(args.path))
        return 0
    if args.command == "demo":
        return run_demo(args)
    if args.command == "fetch":
        from kontext_core.tools.fetch import run_fetch

        return run_fetch(args)

    from PIL import Image

    from kontext_core.policy import safety

    _refuse_bad_out(args.out)
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise ValueError(f"--lora {path}: no such file")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value % 16:
            print(f"note: --{name} {value} is not a multiple of 16 and is rounded down", file=sys.stderr)
    if not args.no_safety_check:  # before anything loads: a refused prompt costs nothing
        _refuse_if_blocked(safety.check_prompt(args.prompt, args.safety_tolerance), "--prompt")
    checked = not args.no_safety_check and _image_classifier_ready(safety)
    images = []
    for path in args.image if args.command == "edit" else []:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {path}: cannot be read as an image ({e})") from None
        if checked:
            _refuse_if_blocked(safety.check_image(images[-1], args.safety_tolerance), f"--image {path}")
    small = _wants_small_model(args)
    pipe, model = load_pipeline(args, small)
    model = _add_loras(pipe, args.lora, model)
    common = dict(
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        num_images=args.num_images,
        callback=_progress(args.command),
    )
    if args.command == "edit":
        result = pipe.edit(
            images,
            args.prompt,
            width=args.width,
            height=args.height,
            resize=args.resize,
            reference_method=args.reference_method,
            reference_cache_every=args.fast,
            **common,
        )
    else:
        size = 64 if small else 1024
        width, height = (size if args.width is None else args.width), (size if args.height is None else args.height)
        result = pipe.generate(args.prompt, width=width, height=height, **common)
    results = result if isinstance(result, list) else [result]
    made_by = _made_by(model, args.prompt, images, steps=args.steps, seed=args.seed, guidance=args.guidance)
    withheld = []
    for image, path in zip(results, _output_paths(args.out, len(results))):
        refusal = None
        if checked:
            try:
                verdict = safety.check_image(image, args.safety_tolerance)
                refusal = verdict.reason if verdict.blocked else None
            except SafetyUnavailableError as e:  # this result unchecked: the others are still checked and written
                refusal = f"it could not be checked ({e})"
        if refusal is not None:
            earlier = " (the file there from before is left as it was)" if path.exists() else ""
            withheld.append(f"{path} not written{earlier}, {refusal}")
            continue
        print(_save(image, path, made_by))
    if withheld:
        raise SafetyBlocked("; ".join(withheld))
    return 0


def _image_classifier_ready(safety) -> bool:
    """Whether the images will be checked. The core install has no classifier: the command says so and goes on
    with the prompt checked only. An installed one that cannot load stops the command here, before sampling."""
    if not safety.image_classifier_installed():
        print(
            f"note: the images are not checked for nudity: the image classifier is not installed "
            f"({safety.INSTALL_HINT})",
            file=sys.stderr,
        )
        return False
    safety.require_image_classifier()
    return True


def _refuse_if_blocked(verdict, what: str) -> None:
    if verdict.blocked:
        raise SafetyBlocked(f"{what} {verdict.reason}")


if __name__ == "__main__":
    sys.exit(main())
