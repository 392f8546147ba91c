"""Storing a trained small transformer in ComfyUI's scaled fp8, to ship it.

    python -m kontext_core.small_model.store_fp8 run/flux1-kontext-small.safetensors \
        kontext_core/small_model/weights/flux1-kontext-small.safetensors

The block Linear weights (`double_blocks.*` / `single_blocks.*`, the bulk of the parameters) become e4m3
with a per-tensor `scale_weight`, next to the `scaled_fp8` marker, as ComfyUI's fp8-scaled FLUX files are;
every other tensor and the file's metadata (`flux_params`, the training record) stay as trained. Every
loader reads it like a real fp8-scaled checkpoint. It halves the file against fp16, which is what lets a
transformer with twice the blocks fit the package's 5 MiB budget per file. Training keeps its fp16 files:
resuming from fp8 would lose the weights' low bits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kontext_core.checkpoints.safetensors_io import SCALED_FP8_MARKERS
from kontext_core.checkpoints.transformer import is_block_linear_weight
from kontext_core.files import written_whole
from kontext_core.runtime.quant import FP8_DTYPES, quantize_fp8

MARKER = SCALED_FP8_MARKERS[0]


def store_fp8(source: Path, target: Path) -> None:
    """Write `source` (a BFL-layout transformer in fp16/bf16/fp32) to `target` with scaled-fp8 block weights."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"source: {source} is not a file; expected a .safetensors transformer")
    try:
        with safe_open(source, "pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"source: {source} is not a readable safetensors file ({e})") from None
    if MARKER in state or any(t.dtype in FP8_DTYPES for t in state.values()):
        raise ValueError(f"source: {source} already holds fp8 tensors; expected a full-precision transformer")
    if not any(is_block_linear_weight(key, t.shape) for key, t in state.items()):
        raise ValueError(f"source: {source} has no double_blocks/single_blocks weights; expected BFL transformer keys")
    stored: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if is_block_linear_weight(key, tensor.shape):
            stored[key], stored[f"{key.removesuffix('.weight')}.scale_weight"] = quantize_fp8(tensor)
        else:
            stored[key] = tensor
    stored[MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    with written_whole(target) as partial:
        save_file(stored, partial, metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the trained transformer (.safetensors, BFL keys)")
    parser.add_argument("target", type=Path, help="where to write the fp8-scaled copy")
    args = parser.parse_args(argv)
    try:
        store_fp8(args.source, args.target)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(
        f"{args.target}: {args.target.stat().st_size / 2**20:.2f} MiB (from {args.source.stat().st_size / 2**20:.2f})"
    )


if __name__ == "__main__":
    main()
