"""Command line: `python -m kontext_core edit|generate|inspect ...`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (explicit paths, or found in <ComfyUI>/models)")
    g.add_argument("--comfyui", help="a ComfyUI folder whose models/ (and tokenizers) to use; default $COMFYUI_ROOT")
    g.add_argument("--transformer", help="FLUX.1 Kontext transformer: .safetensors file or diffusers transformer/ folder")
    g.add_argument("--vae", help="ae.safetensors or a diffusers vae/ folder")
    g.add_argument("--t5", help="T5-XXL encoder: t5xxl_*.safetensors or a diffusers text_encoder_2/ folder")
    g.add_argument("--clip", help="CLIP-L: clip_l.safetensors or a diffusers text_encoder/ folder")
    g.add_argument("--t5-tokenizer", help="folder with the T5 tokenizer (Hugging Face format)")
    g.add_argument("--clip-tokenizer", help="folder with the CLIP tokenizer (Hugging Face format)")
    g.add_argument("--t5-max-length", type=int, default=512, help="T5 pad length: 512 (BFL/diffusers) or 256 (ComfyUI)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=list(DTYPES), default="auto", help="compute precision (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--attention", default="auto", help="attention kernel: auto, sdpa, flash, sage")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", help="enables true CFG together with --true-cfg-scale > 1")
    p.add_argument("--true-cfg-scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", required=True, help="output PNG; with several images, _1, _2 … are appended")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kontext_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit one or more reference images following a prompt")
    edit.add_argument("--image", action="append", required=True, help="reference image; repeat for several")
    edit.add_argument("--width", type=int)
    edit.add_argument("--height", type=int)
    edit.add_argument("--resize", choices=["stretch", "crop", "keep"], default="stretch")
    edit.add_argument("--reference-method", choices=["offset", "index", "uxo"], default="offset")
    edit.add_argument("--fast", type=int, default=0, metavar="K", help="approximate fast mode: reuse reference K/V for K steps")
    _add_sampling_options(edit)
    _add_model_options(edit)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    _add_sampling_options(gen)
    _add_model_options(gen)

    inspect = sub.add_parser("inspect", help="tell what a model file is, without loading its tensors")
    inspect.add_argument("path")
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


def load_pipeline(args: argparse.Namespace):
    from . import load_text_encoder, load_transformer, load_vae
    from .discovery import resolve_model_files
    from .math import set_attention_backend
    from .pipeline import KontextPipeline

    files = resolve_model_files(
        transformer=args.transformer, vae=args.vae, t5=args.t5, clip=args.clip, comfyui_root=args.comfyui
    )
    dtype = DTYPES[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    set_attention_backend(args.attention)
    print(f"transformer: {files.transformer}\nvae: {files.vae}\nt5: {files.t5}\nclip: {files.clip}", file=sys.stderr)
    transformer = load_transformer(files.transformer, device=args.device, dtype=dtype)
    vae = load_vae(files.vae, device=args.device, dtype=dtype)
    text = load_text_encoder(
        t5=files.t5, clip=files.clip, t5_tokenizer=args.t5_tokenizer, clip_tokenizer=args.clip_tokenizer,
        t5_max_length=args.t5_max_length, device=args.device, dtype=dtype, comfyui_root=files.comfyui_root,
    )  # fmt: skip
    return KontextPipeline(transformer, vae, text)


def _save(images, out: str) -> list[Path]:
    images = images if isinstance(images, list) else [images]
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths = [target] if len(images) == 1 else [target.with_name(f"{target.stem}_{i + 1}{target.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        tmp = path.with_name(path.name + ".part")
        image.save(tmp, format="PNG")
        tmp.replace(path)  # never leave a half-written image behind
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        from .checkpoints.inspect import describe

        print(describe(args.path))
        return 0

    from PIL import Image

    pipe = load_pipeline(args)
    common = dict(
        steps=args.steps, guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale, num_images=args.num_images, callback=_progress(args.command),
    )  # fmt: skip
    if args.command == "edit":
        images = []
        for path in args.image:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as e:
                raise SystemExit(f"--image {path}: cannot be read as an image ({e})") from None
        result = pipe.edit(
            images, args.prompt, width=args.width, height=args.height, resize=args.resize,
            reference_method=args.reference_method, reference_cache_every=args.fast, **common,
        )  # fmt: skip
    else:
        result = pipe.generate(args.prompt, width=args.width, height=args.height, **common)
    for path in _save(result, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
