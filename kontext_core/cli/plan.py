"""`kontext inspect --plan --vram GiB`: what fits on a card with the user's model files (read from their headers)."""

from __future__ import annotations

import argparse

from kontext_core.cli.options import at_least, positive


def add_plan_arguments(inspect: argparse.ArgumentParser) -> None:
    """The memory plan's options on the `inspect` command."""
    g = inspect.add_argument_group(
        "memory plan",
        "With --plan, the files are the ones edit would use (the paths given, else <ComfyUI>/models or the "
        "Hugging Face cache); PATH, if given, is the transformer.",
    )
    g.add_argument("--plan", action="store_true", help="say what fits on a card of --vram GiB, and with which options")
    g.add_argument("--vram", type=positive, help="the card's memory in GiB (default: this machine's CUDA device)")
    g.add_argument("--width", type=at_least(16), default=1024, help="output width (default 1024)")
    g.add_argument("--height", type=at_least(16), default=1024, help="output height (default 1024)")
    g.add_argument("--references", type=at_least(0), default=1, help="reference images (default 1; 0: generate)")
    g.add_argument("--comfyui", help="a ComfyUI folder whose models/ to use; default $COMFYUI_ROOT")
    for role in ("transformer", "t5", "clip", "vae"):
        g.add_argument(f"--{role}", help=f"the {role} file (default: found as for edit)")


def run_plan(args: argparse.Namespace) -> int:
    from kontext_core.runtime.memory_plan import describe_plan, plan_for_files
    from kontext_core.tools.discovery import resolve_model_files

    if args.path and args.transformer:
        raise ValueError("give the transformer either as PATH or as --transformer, not both")
    vram = args.vram if args.vram is not None else _device_gib()
    files = resolve_model_files(
        transformer=args.path or args.transformer, vae=args.vae, t5=args.t5, clip=args.clip, comfyui_root=args.comfyui
    )
    inputs = plan_for_files(
        files.transformer,
        files.t5,
        files.clip,
        files.vae,
        width=args.width,
        height=args.height,
        references=args.references,
    )
    roles = {"transformer": files.transformer, "t5": files.t5, "clip": files.clip, "vae": files.vae}
    print(describe_plan(inputs, vram, {role: str(path) for role, path in roles.items()}))
    return 0


def _device_gib() -> float:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--plan needs --vram GiB: there is no CUDA device here to read it from")
    return torch.cuda.get_device_properties(0).total_memory / 2**30
