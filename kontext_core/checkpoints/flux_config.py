"""What a set of tensors says about a FLUX transformer: whether it is one, and its `FluxParams`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from kontext_core.model.config import FLUX_KONTEXT_DEV, FluxParams, default_axes_dim
from kontext_core.checkpoints.safetensors_io import (
    CheckpointError,
)


def wrong_architecture(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why these tensors are not a FLUX.1 [dev]/Kontext transformer, or None if they may be one."""
    key_set = set(keys)
    if any(".lora_" in k or k.startswith("lora_unet_") or ".lora." in k for k in keys):
        return (
            "this is a LoRA, not a model: load the base model, then apply it with kontext_core.runtime.lora.apply_lora"
        )
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


def flux_params_from_tensors(
    tensors: Mapping[str, torch.Tensor | Sequence[int]],
    origin: str | os.PathLike = "state dict",
    axes_dim: Sequence[int] | None = None,
) -> FluxParams:
    """The transformer's config from BFL-named tensors (or their shapes); the RoPE axes from `axes_dim` or the head-dim rule."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in tensors.items()}
    reason = wrong_architecture(list(shapes), shapes)
    if reason:
        raise CheckpointError(origin, reason)

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
            theta=FLUX_KONTEXT_DEV.theta,  # no tensor shows it; every FLUX.1 model uses 10,000
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError):
        raise CheckpointError(
            origin,
            "incomplete FLUX transformer: img_in, txt_in, vector_in, final_layer or "
            "double_blocks.0 tensors are missing",
        ) from None
    if sum(params.axes_dim) != head_dim:
        raise CheckpointError(origin, f"RoPE axes {params.axes_dim} do not sum to the head dim {head_dim}")
    return params
