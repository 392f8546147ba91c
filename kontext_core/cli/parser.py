"""The command line's arguments: one parser for every subcommand of `kontext` / `python -m kontext_core`."""

from __future__ import annotations

import argparse

from kontext_core.cli.options import at_least, lora_option
from kontext_core.cli.parallel import add_parallel_options
from kontext_core.policy.tolerance import DEFAULT_TOLERANCE, MAX_TOLERANCE, MIN_TOLERANCE, TOLERANCE_HELP
from kontext_core.synthetic.tasks import HELD_OUT_SEED, KINDS


DESCRIPTION = """FLUX.1 Kontext from the command line (also `python -m kontext_core`).

With no FLUX.1 Kontext [dev] files configured (no paths, no ComfyUI folder, nothing in the Hugging Face
cache), `edit` and `generate` run the built-in small model and say so."""
# Commands with a command line of their own: `kontext NAME ARGS` runs MODULE.main(ARGS)
DELEGATED = {
    "queue": ("kontext_core.tools.comfyui_client.cli", "queue a batch of edits on a running ComfyUI server"),
    "provenance": ("kontext_core.policy.provenance", "make a test signing CA, or verify a PNG's C2PA manifest"),
    "train-flux": ("kontext_core.small_model.train_flux", "train the built-in small transformer"),
    "train-vae": ("kontext_core.small_model.train_vae", "train the built-in small VAE"),
    "store-fp8": ("kontext_core.small_model.store_fp8", "store a small transformer's block weights as scaled fp8"),
}
DEMO_SEED = HELD_OUT_SEED  # the first held-out task: a recolour of a held-out (colour, shape, place)
# Choices by name only, so that building the parser (and `kontext --help`) does not import torch: cli/models.py
# maps them to dtypes when a model loads, and a test keeps WEIGHT_DTYPE_CHOICES equal to the engine's WEIGHT_DTYPES.
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
WEIGHT_DTYPE_CHOICES = ("default", "fp8_e4m3fn", "fp8_e5m2")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (explicit paths, or found in <ComfyUI>/models)")
    g.add_argument("--comfyui", help="a ComfyUI folder whose models/ (and tokenizers) to use; default $COMFYUI_ROOT")
    g.add_argument(
        "--transformer", help="FLUX.1 Kontext transformer: .safetensors file or diffusers transformer/ folder"
    )
    g.add_argument("--vae", help="ae.safetensors or a diffusers vae/ folder")
    g.add_argument(
        "--t5",
        help="T5-XXL encoder: t5xxl_*.safetensors, a GGUF (t5-v1_1-xxl-encoder-Q8_0.gguf) or a diffusers text_encoder_2/",
    )
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
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps …; default: cuda when there is one, else cpu")
    g.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="compute precision (auto: bf16 on CUDA, fp32 on CPU)"
    )
    g.add_argument(
        "--weight-dtype",
        choices=WEIGHT_DTYPE_CHOICES,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext", description=DESCRIPTION)
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
    add_parallel_options(edit)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--width", type=at_least(16), help="default 1024 (real model) or 64 (small model)")
    gen.add_argument("--height", type=at_least(16), help="default 1024 (real model) or 64 (small model)")
    _add_sampling_options(gen)
    _add_safety_options(gen)
    _add_model_options(gen)
    add_parallel_options(gen)

    demo = sub.add_parser(
        "demo", help="a held-out synthetic edit with the built-in small model: before/after/truth PNGs"
    )
    demo.add_argument("--out", default="kontext-demo", help="folder for before.png, after.png, truth.png")
    demo.add_argument("--seed", type=int, default=DEMO_SEED, help=f"task seed (held out from {HELD_OUT_SEED} up)")
    demo.add_argument("--kind", choices=KINDS, help="task kind (default: the seed's)")
    demo.add_argument("--steps", type=at_least(1), default=28, help="sampling steps (default 28)")

    inspect = sub.add_parser("inspect", help="tell what a model file is, or what fits on a card, from headers alone")
    inspect.add_argument("path", nargs="?", help="the model file (with --plan: the transformer, optional)")
    from kontext_core.cli.plan import add_plan_arguments

    add_plan_arguments(inspect)

    from kontext_core.cli.fetch import add_fetch_parser

    add_fetch_parser(sub)
    for name, (_, help) in DELEGATED.items():
        # parsed by the command's own main (`kontext NAME --help`); listed here so `kontext --help` shows it
        sub.add_parser(name, help=help, add_help=False)
    return parser
