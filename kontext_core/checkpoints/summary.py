"""What a model file is, from its header alone: for `python -m kontext_core inspect FILE`."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from kontext_core.checkpoints.gguf_io import ACCEPT_EITHER, GGUFSource
from kontext_core.checkpoints.safetensors_io import open_tensors
from kontext_core.checkpoints.t5_gguf import is_llama_cpp_t5


def describe(path: str | os.PathLike) -> str:
    """A few lines naming the file's kind, precision, size and tensor count; never reads a tensor. A file that is
    not a safetensors (or GGUF) checkpoint raises CheckpointError saying why."""
    path = Path(path)
    source = GGUFSource(path, accept=ACCEPT_EITHER) if path.suffix.lower() == ".gguf" else open_tensors(path)
    keys = source.keys()
    lines = [f"{path}", f"  kind:      {_kind(keys)}", f"  tensors:   {len(keys)}, {_size(source.nbytes())}"]
    if hasattr(source, "quant_types"):  # GGUF: its GGML types, not the float types they are read as
        types = sorted(source.quant_types().items(), key=lambda item: -item[1])
        lines.append(
            f"  GGUF:      {', '.join(f'{t} ×{n}' for t, n in types)} (kept quantized when loaded; dequantize=True expands them)"
        )
    else:
        dtypes = Counter(str(source.dtype(k)).replace("torch.", "") for k in keys)
        lines.append(f"  dtypes:    {', '.join(f'{d} ×{n}' for d, n in dtypes.most_common())}")
    if "scaled_fp8" in keys or any(k.endswith((".scale_weight", ".weight_scale")) for k in keys):
        lines.append("  quantized: ComfyUI scaled fp8 (per-layer weight scales)")
    if source.metadata:
        lines.append(f"  metadata:  {', '.join(sorted(source.metadata))}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _kind(keys: list[str]) -> str:
    def has(*parts: str) -> bool:
        return any(part in k for k in keys for part in parts)

    if any(".lora_" in k or k.startswith("lora_unet_") for k in keys):
        return "LoRA"
    if has("double_blocks."):
        return "FLUX transformer (BFL layout)"
    if has("transformer_blocks.", "single_transformer_blocks."):
        return "FLUX transformer (diffusers layout)"
    if has("input_blocks."):
        return "UNet (SD1.x/SDXL family): not usable by Kontext Core"
    if has("encoder.conv_in.", "first_stage_model.", "encoder.down_blocks."):
        return "VAE"
    if any(".SelfAttention." in k for k in keys):
        return "T5 text encoder"
    if is_llama_cpp_t5(keys):
        return "T5 text encoder (llama.cpp names)"
    if any("token_embedding" in k for k in keys):
        return "CLIP text encoder"
    return "unknown"
