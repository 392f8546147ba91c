"""Loading the FLUX.1 Kontext transformer from every file a ComfyUI user has.

BFL single files (bf16/fp16/fp32, with or without ComfyUI's `model.diffusion_model.` prefix), plain
fp8, ComfyUI's scaled fp8 (`scaled_fp8` marker + per-layer `scale_weight`, or `weight_scale` with a
`_quantization_metadata` header), and diffusers `transformer/` folders (sharded or not). The model is
built on `meta` and its tensors assigned one by one from the memory-mapped file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import FluxParams, default_axes_dim
from ..model import Flux
from ..quant import FP8_DTYPES, enable_fp8_matmul, use_fp8_linears
from .flux_diffusers import Recipe, diffusers_recipes, is_diffusers_flux, recipe_shape, unused_keys
from .safetensors_io import (
    CheckpointError,
    TensorSource,
    assign_tensors,
    ensure_materialized,
    open_tensors,
    read_config_json,
)

FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
MARKER_KEYS = ("scaled_fp8",)


def wrong_architecture(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why these tensors are not a FLUX.1 [dev]/Kontext transformer, or None if they may be one."""
    key_set = set(keys)
    if any(".lora_" in k or k.startswith("lora_unet_") or ".lora." in k for k in keys):
        return "this is a LoRA, not a model: load the base model, then apply it with kontext_core.lora.apply_lora"
    if any(re.search(r"(^|\.)input_blocks\.\d+\.", k) for k in keys) or any(k.startswith("down_blocks.") for k in keys):
        return "this is a UNet (SD1.x/SDXL family), not a FLUX transformer"
    if "redux_up.weight" in key_set or "redux_down.weight" in key_set:
        return "this is the FLUX Redux image embedder, not a FLUX transformer"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
        return "this is a VAE, not a FLUX transformer: load it with load_vae / the VAE loader"
    if any(".SelfAttention." in k for k in keys) or "shared.weight" in key_set:
        return "this is a T5 text encoder, not a FLUX transformer: load it with load_text_encoder"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return "this is a CLIP text encoder, not a FLUX transformer: load it with load_text_encoder"
    if "img_in.weight" not in shapes:
        return "no FLUX transformer tensors (img_in, double_blocks, single_blocks) found"
    in_channels = shapes["img_in.weight"][1]
    if in_channels != 64:
        variant = {384: "FLUX.1 Fill", 128: "FLUX.1 Depth/Canny"}.get(in_channels, "another FLUX variant")
        return (
            f"img_in takes {in_channels} channels: this is {variant}, which Kontext Core does not run "
            "(FLUX.1 [dev]/Kontext takes 64)"
        )
    return None


def flux_params_from_shapes(
    shapes: dict[str, tuple[int, ...]], origin: str | os.PathLike, axes_dim: list[int] | None = None
) -> FluxParams:
    """The transformer's config from its tensor shapes; the RoPE axes from `axes_dim` or the head-dim rule."""

    def count(pattern: str) -> int:
        found = [int(m[1]) for k in shapes if (m := re.match(pattern, k))]
        return 1 + max(found) if found else 0

    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        params = FluxParams(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            num_heads=hidden // head_dim,
            depth=count(r"double_blocks\.(\d+)\."),
            depth_single_blocks=count(r"single_blocks\.(\d+)\."),
            axes_dim=list(axes_dim) if axes_dim is not None else default_axes_dim(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError):
        raise CheckpointError(origin, "incomplete FLUX transformer: img_in, txt_in, vector_in, final_layer or "
                                      "double_blocks.0 tensors are missing") from None  # fmt: skip
    if sum(params.axes_dim) != head_dim:
        raise CheckpointError(origin, f"RoPE axes {params.axes_dim} do not sum to the head dim {head_dim}")
    return params


@dataclass
class FluxLayout:
    """What a transformer file holds, in BFL names: shapes, how to read each tensor, fp8 scales."""

    source: TensorSource
    shapes: dict[str, tuple[int, ...]]
    recipes: dict[str, Recipe]
    scales: dict[str, str] = field(default_factory=dict)  # layer name -> key of its weight scale
    metadata_params: dict | None = None
    config_axes: list[int] | None = None

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self.recipes[key].parts[0])

    def read(self, key: str) -> torch.Tensor:
        return self.recipes[key].build(self.source.tensor)

    def scale(self, layer: str) -> torch.Tensor:
        key = self.scales.get(layer)
        return self.source.tensor(key).float().reshape(()) if key else torch.ones(())


def read_layout(path: Path) -> FluxLayout:
    source = open_tensors(path)
    all_keys = source.keys()
    prefix = next((p for p in FLUX_PREFIXES if any(k.startswith(p) for k in all_keys)), "")
    # a full ComfyUI checkpoint also holds the VAE and text encoders: take the diffusion model only
    local = {k[len(prefix) :]: k for k in all_keys if k.startswith(prefix)}
    scale_keys = {k: full for k, full in local.items() if k.endswith(SCALE_SUFFIXES) or k in MARKER_KEYS}
    weights = {k: full for k, full in local.items() if k not in scale_keys}
    scales = {}
    for k, full in scale_keys.items():
        if k.endswith((".scale_weight", ".weight_scale")):
            scales[k.rsplit(".", 1)[0]] = full

    if is_diffusers_flux(list(weights)):
        diffusers = diffusers_recipes(list(weights))
        leftover = unused_keys(list(weights), diffusers)
        if leftover:
            raise CheckpointError(path, f"unexpected keys for a diffusers FLUX transformer: {', '.join(leftover[:8])}")
        recipes = {k: Recipe(tuple(weights[p] for p in r.parts), r.swap_halves) for k, r in diffusers.items()}
        shapes = {k: recipe_shape(r, source.shape) for k, r in recipes.items()}
    else:
        recipes = {k: Recipe((full,)) for k, full in weights.items()}
        shapes = {k: source.shape(full) for k, full in weights.items()}

    reason = wrong_architecture(list(weights), shapes)
    if reason:
        raise CheckpointError(path, reason)

    metadata_params = None
    if "flux_params" in source.metadata:
        try:
            metadata_params = json.loads(source.metadata["flux_params"])
        except json.JSONDecodeError:
            raise CheckpointError(path, "the `flux_params` entry in the file's metadata is not valid JSON") from None
    config = read_config_json(path) if path.is_dir() else None
    config_axes = list(config["axes_dims_rope"]) if config and "axes_dims_rope" in config else None
    return FluxLayout(source, shapes, recipes, scales, metadata_params, config_axes)


def _check_device_dtype(device: torch.device, dtype: torch.dtype | None) -> None:
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CheckpointError(device, "this GPU does not support bf16: choose fp16 or fp32 as the compute dtype")
    if dtype is not None and (not dtype.is_floating_point or dtype in FP8_DTYPES):
        raise ValueError(f"dtype must be a float compute dtype (bf16, fp16, fp32), got {dtype}")


def load_transformer(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    axes_dim: list[int] | None = None,
    weight_dtype: torch.dtype | None = None,
    fp8_matmul: bool = False,
) -> Flux:
    """A FLUX.1 Kontext (or [dev]) transformer, its config inferred from the tensors.

    `dtype=None` keeps the file's precision: an fp8 file stays fp8 in memory (computing in bf16);
    a float `dtype` sets the compute precision, and fp8 weights are then dequantized unless
    `weight_dtype` is an fp8 type, which keeps (or casts) the block weights in fp8. `fp8_matmul`
    multiplies in fp8 on GPUs that can (compute capability 8.9+).
    """
    path = Path(path)
    device = torch.device(device)
    _check_device_dtype(device, dtype)
    if weight_dtype is not None and weight_dtype not in FP8_DTYPES and weight_dtype != dtype:
        raise ValueError(f"weight_dtype must be None or an fp8 dtype ({FP8_DTYPES}), got {weight_dtype}")
    layout = read_layout(path)

    if layout.metadata_params is not None:
        try:
            params = FluxParams(**layout.metadata_params)
        except TypeError as e:
            raise CheckpointError(path, f"the `flux_params` metadata does not fit FluxParams ({e})") from None
    else:
        params = flux_params_from_shapes(layout.shapes, path, axes_dim or layout.config_axes)

    linear_weights = {k for k in layout.shapes if k.endswith(".weight") and len(layout.shapes[k]) == 2}
    file_fp8 = {k[: -len(".weight")] for k in linear_weights if layout.dtype(k) in FP8_DTYPES}
    if weight_dtype in FP8_DTYPES:
        block_linears = {k[: -len(".weight")] for k in linear_weights if k.startswith(("double_blocks.", "single_blocks."))}
        fp8_layers = file_fp8 | block_linears
    else:
        fp8_layers = file_fp8 if dtype is None else set()
    compute = dtype or (torch.bfloat16 if file_fp8 or fp8_layers else None)

    with torch.device("meta"):
        model = Flux(params)
    if fp8_layers:
        use_fp8_linears(model, fp8_layers)

    shapes = dict(layout.shapes)
    for layer in fp8_layers:
        shapes[f"{layer}.scale_weight"] = ()

    def get(key: str) -> torch.Tensor:
        layer, _, param = key.rpartition(".")
        if param == "scale_weight":
            return layout.scale(layer)
        t = layout.read(key)
        if layer in fp8_layers and param == "weight":
            return t if t.dtype in FP8_DTYPES else t.to(weight_dtype)
        if t.dtype in FP8_DTYPES:  # dequantize for a full-precision copy
            return t.to(compute or torch.float32) * layout.scale(layer).to(compute or torch.float32)
        return t.to(compute) if compute is not None and t.is_floating_point() else t

    assign_tensors(model, shapes, get, path, device=device, what="FLUX transformer")
    ensure_materialized(model, path)
    model.compute_dtype = compute
    if fp8_matmul:
        enable_fp8_matmul(model)
    return model.eval().requires_grad_(False)
