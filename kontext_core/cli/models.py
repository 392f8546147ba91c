"""Which model a command runs (the built-in small model, or the real files wherever they are) and loading it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the pipeline load only when a command runs a model, not for --help
    from kontext_core.pipeline import KontextPipeline


REAL_MODEL_HINT = (
    "For real images pass --transformer/--vae/--t5/--clip or --comfyui, or download FLUX.1 Kontext [dev] with "
    "`python -m kontext_core fetch`."
)


def wants_small_model(args: argparse.Namespace) -> bool:
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
    from kontext_core.runtime.quant import COMPUTE_DTYPES, weight_options

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1, mps …)") from None
    if small:
        from kontext_core.small_model import NOTICE, load_default_pipeline, small_model_files

        print(f"{NOTICE}. {REAL_MODEL_HINT}", file=sys.stderr)
        pipe = load_default_pipeline(device=device)
        pipe.transformer.attention_backend = args.attention
        return pipe, model_name(small_model_files().transformer.name, builtin=True)
    files = resolve_model_files(
        transformer=args.transformer, vae=args.vae, t5=args.t5, clip=args.clip, comfyui_root=args.comfyui
    )
    dtype = COMPUTE_DTYPES[args.dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)  # or auto
    print(f"transformer: {files.transformer}\nvae: {files.vae}\nt5: {files.t5}\nclip: {files.clip}", file=sys.stderr)
    transformer = load_transformer(files.transformer, device=device, dtype=dtype, **weight_options(args.weight_dtype))
    vae = load_vae(files.vae, device=device, dtype=dtype)
    text = load_text_encoder(
        t5=files.t5,
        clip=files.clip,
        t5_tokenizer=args.t5_tokenizer or files.t5_tokenizer,
        clip_tokenizer=args.clip_tokenizer or files.clip_tokenizer,
        t5_max_length=args.t5_max_length,
        device=device,
        dtype=dtype,
        comfyui_root=files.comfyui_root,
    )
    transformer.attention_backend = args.attention
    return KontextPipeline(transformer, vae, text), model_name(str(files.transformer))


def add_loras(pipe: KontextPipeline, loras: list[tuple[str, float]], model: str) -> str:
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
