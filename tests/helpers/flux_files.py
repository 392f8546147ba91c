"""Write a tiny Flux to disk in every layout a ComfyUI user has, and the references to compare against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.helpers.gguf_files import finish, gguf_writer

from kontext_core.model.config import FluxParams
from kontext_core.model.flux import Flux
from kontext_core.sampling import pack, position_ids, reference_tokens

DATA = Path(__file__).resolve().parents[1] / "data"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """A `key <TAB> shape [<TAB> dtype]` manifest from tests/data as {key: shape}."""
    rows = (DATA / name).read_text().splitlines()[1:]
    return {
        k: tuple(int(x) for x in s.strip("[]").split(",") if x.strip()) for k, s, *_ in (r.split("\t") for r in rows)
    }


def flux_inputs(params: FluxParams, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Forward inputs for a 3×4-token image, 5 text tokens (non-square everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 12, 64, generator=gen),
        position_ids(3, 4)[None],
        torch.randn(1, 5, params.context_in_dim, generator=gen),
        torch.zeros(1, 5, 3),
        torch.tensor([0.6]),
        torch.randn(1, params.vec_in_dim, generator=gen),
        torch.tensor([2.5]),
    )


def kontext_inputs(params: FluxParams, batch: int = 2, seed: int = 1):
    """Non-square target (6×10 latent tokens) and a reference of another shape, as a Kontext edit sends."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, 16, 12, 20, generator=gen)
    reference = torch.randn(1, 16, 16, 8, generator=gen)
    ref_tok, ref_ids = reference_tokens([reference], (12, 20), "offset")
    img = torch.cat((pack(target), ref_tok.expand(batch, -1, -1)), dim=1)
    img_ids = torch.cat((position_ids(6, 10), ref_ids))[None].expand(batch, -1, -1)
    txt = torch.randn(batch, 7, params.context_in_dim, generator=gen)
    txt_ids = torch.zeros(batch, 7, 3)
    y = torch.randn(batch, params.vec_in_dim, generator=gen)
    t = torch.tensor([0.83, 0.27])[:batch]
    guidance = torch.tensor([2.5, 4.0])[:batch]
    return img, img_ids, txt, txt_ids, t, y, guidance


def save_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def model_from_state(params: FluxParams, state: dict[str, torch.Tensor]) -> Flux:
    """An fp32 Flux holding `state` (e.g. the dequantized twin of an fp8 file)."""
    model = Flux(params)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def is_block_linear(key: str, value: torch.Tensor) -> bool:
    return key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and value.ndim == 2


def bfl_file(model: Flux, path: Path, dtype: torch.dtype | None = None, prefix: str = "") -> Path:
    """BFL keys (optionally prefixed like a ComfyUI checkpoint), every tensor in `dtype` if given."""
    state = {prefix + k: v.to(dtype) if dtype else v for k, v in model.state_dict().items()}
    return save_state(path, state)


def plain_fp8_file(model: Flux, path: Path, fp8: torch.dtype) -> tuple[Path, dict[str, torch.Tensor]]:
    """Block Linear weights cast straight to fp8 (no scale); returns the file and its dequantized state."""
    state = {k: v.to(fp8) if is_block_linear(k, v) else v for k, v in model.state_dict().items()}
    return save_state(path, state), {k: v.float() for k, v in state.items()}


def quantize(w: torch.Tensor, fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / torch.finfo(fp8).max
    return (w / scale).to(fp8), scale


def scaled_fp8_file(model: Flux, path: Path, form: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """ComfyUI scaled fp8, block Linears quantized per tensor; returns the file and its dequantized state.

    form: "scale_weight" (a `scaled_fp8` marker + `.scale_weight`, with `.scale_input`), "weight_scale"
    (`.weight_scale` + a `_quantization_metadata` header, prefixed keys), or "comfy_quant" (`.weight_scale` +
    per-layer `.comfy_quant` JSON blobs, fp8 bytes in uint8 containers).
    """
    prefix = "model.diffusion_model." if form == "weight_scale" else ""
    state, dequantized, layers = {}, {}, {}
    for key, value in model.state_dict().items():
        dequantized[key] = value
        if not is_block_linear(key, value):
            state[prefix + key] = value
            continue
        layer = key.removesuffix(".weight")
        q, scale = quantize(value)
        dequantized[key] = q.float() * scale
        if form == "scale_weight":
            state[key] = q
            state[f"{layer}.scale_weight"] = scale
            state[f"{layer}.scale_input"] = torch.tensor(1.0)
        elif form == "weight_scale":
            state[prefix + key] = q
            state[f"{prefix}{layer}.weight_scale"] = scale
            layers[prefix + layer] = {"format": "float8_e4m3fn"}
        else:
            state[key] = q.view(torch.uint8)
            state[f"{layer}.weight_scale"] = scale
            state[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    metadata = None
    if form == "scale_weight":
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif form == "weight_scale":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return save_state(path, state, metadata), dequantized


def diffusers_folder(model: Flux, folder: Path, shard_bytes: int = 200_000) -> Path:
    """A diffusers `transformer/` folder: sharded safetensors + index + config.json with the RoPE axes."""
    from tests.helpers.reference_mappings import bfl_to_diffusers  # independent of the engine's own converter

    p = model.params
    state = bfl_to_diffusers(model.state_dict(), p.hidden_size)
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, value in state.items():
        if sum(v.numel() * v.element_size() for v in shards[-1].values()) > shard_bytes:
            shards.append({})
        shards[-1][key] = value
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_state(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "_class_name": "FluxTransformer2DModel",
        "in_channels": p.in_channels,
        "num_layers": p.depth,
        "num_single_layers": p.depth_single_blocks,
        "attention_head_dim": p.hidden_size // p.num_heads,
        "num_attention_heads": p.num_heads,
        "joint_attention_dim": p.context_in_dim,
        "pooled_projection_dim": p.vec_in_dim,
        "guidance_embeds": p.guidance_embed,
        "axes_dims_rope": list(p.axes_dim),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_gguf(
    path,
    state: dict[str, torch.Tensor],
    *,
    prefix: str = "",
    architecture: str | None = "flux",
    fields=(),
    quantized_kinds=None,
) -> dict[str, torch.Tensor]:
    """A GGUF file as ComfyUI-GGUF's converter writes one (the `gguf` package's writer and quantizers): each 2-D
    weight whose rows fit 32-value blocks in one of `quantized_kinds` in turn (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16
    by default), the others F16 (2-D) or F32; `architecture=None` writes none, as stable-diffusion.cpp does.
    Returns {key: the weight its reader should give}."""
    import gguf

    q = gguf.GGMLQuantizationType
    kinds = (q.Q8_0, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.BF16) if quantized_kinds is None else quantized_kinds
    writer = gguf_writer(path, architecture)
    for key, value in fields:
        writer.add_array(key, value)
    expected, quantized = {}, 0
    for key, value in state.items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            kind = kinds[quantized % len(kinds)]
            quantized += 1
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(prefix + key, data, raw_dtype=kind)
            expected[key] = torch.from_numpy(gguf.quants.dequantize(data, kind)).reshape(array.shape)
        else:
            stored = array.astype(np.float16) if array.ndim > 1 else array
            writer.add_tensor(prefix + key, stored)
            expected[key] = torch.from_numpy(stored.astype(np.float32))
    finish(writer)
    return expected
