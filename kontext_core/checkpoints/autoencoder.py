"""Loading the FLUX VAE from BFL `ae.safetensors`, diffusers `vae/` folders and ComfyUI full checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.model.config import AutoEncoderParams
from kontext_core.checkpoints.safetensors_io import CheckpointError, TensorSource, open_tensors, read_config_json
from kontext_core.checkpoints.safetensors_io import assign_tensors, ensure_materialized

# Full ComfyUI checkpoints carry the VAE beside other models under one of these prefixes.
VAE_PREFIXES = ("first_stage_model.", "vae.")


def diffusers_vae_key_to_bfl(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key → its BFL name. The decoder's up blocks are numbered in reverse."""
    k = key
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", k)
    k = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", k)
    k = k.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
    k = k.replace(".mid_block.block.0.", ".mid.block_1.").replace(".mid_block.block.1.", ".mid.block_2.")
    k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    attn = {".group_norm.": ".norm.", ".to_q.": ".q.", ".to_k.": ".k.", ".to_v.": ".v.", ".to_out.0.": ".proj_out."}
    for theirs, ours in attn.items():
        k = k.replace(theirs, ours)
    return k


def is_attention_projection(bfl_key: str) -> bool:
    return bool(re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key))


def vae_names(keys: Iterable[str]) -> dict[str, str]:
    """BFL name → key in the file, for the VAE tensors among `keys`; empty when they hold no VAE.

    Takes a bare VAE in BFL or diffusers names, or the VAE part of a full checkpoint (`first_stage_model.`,
    `vae.`); other models' tensors in a full checkpoint are left out.
    """
    keys = list(keys)
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
    names = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    levels = [int(m[1]) for k in names if (m := re.match(r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.", k))]
    if levels:
        names = {diffusers_vae_key_to_bfl(k, 1 + max(levels)): v for k, v in names.items()}
    return names if "encoder.conv_in.weight" in names or "decoder.conv_in.weight" in names else {}


def is_vae_checkpoint(source: TensorSource | str | os.PathLike) -> bool:
    """Whether a file (or diffusers folder) holds an autoencoder, alone or inside a full checkpoint.

    Reads headers only (an unreadable file raises CheckpointError). Says nothing about the latent width:
    `load_vae` refuses a 4-channel SD VAE.
    """
    source = source if isinstance(source, TensorSource) else open_tensors(_vae_folder(Path(source)))
    return bool(vae_names(source.keys()))


def vae_params_from_shapes(shapes: dict[str, tuple[int, ...]], origin: str | os.PathLike) -> AutoEncoderParams:
    """Widths and depths of a BFL-named VAE, read from its tensor shapes."""
    try:
        conv_in = shapes["encoder.conv_in.weight"]
        levels = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        ch = conv_in[0]
        ch_mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)]
        z_channels = shapes["encoder.conv_out.weight"][0] // 2
        out_ch = shapes["decoder.conv_out.weight"][0]
    except (KeyError, ValueError):
        raise CheckpointError(
            origin, "not a complete VAE: encoder/decoder tensors of an autoencoder are missing"
        ) from None
    if z_channels != 16:
        raise CheckpointError(
            origin,
            f"a VAE with {z_channels} latent channels is not the 16-channel FLUX VAE "
            "(4 channels: an SD1.x/SDXL VAE). Use FLUX's ae.safetensors.",
        )
    return AutoEncoderParams(
        in_channels=conv_in[1], ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z_channels
    )


def check_norm_groups(params: AutoEncoderParams, origin: str | os.PathLike) -> None:
    widths = {params.ch, *(params.ch * m for m in params.ch_mult)}
    if any(w % params.norm_groups for w in widths):
        raise CheckpointError(
            origin,
            f"VAE widths {sorted(widths)} are not all multiples of {params.norm_groups}, the GroupNorm groups "
            "its layers need (set norm_num_groups in the config)",
        )


def _config_constants(source: TensorSource, folder_config: dict | None) -> dict[str, float]:
    """scale/shift and GroupNorm groups from a diffusers config.json or a `config` JSON in the file's
    metadata, where given."""
    config = folder_config
    if config is None and "config" in source.metadata:
        try:
            config = json.loads(source.metadata["config"])
        except json.JSONDecodeError:
            raise CheckpointError(
                source.origin, "the `config` entry in the file's metadata is not valid JSON"
            ) from None
    if not isinstance(config, dict):
        return {}
    # diffusers spells it scaling_factor; BFL's AutoEncoderParams scale_factor
    found = {
        "scale_factor": config.get("scaling_factor", config.get("scale_factor")),
        "shift_factor": config.get("shift_factor"),
        "norm_groups": config.get("norm_num_groups"),
    }
    constants = {}
    for name, value in found.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(source.origin, f"the config's {name} is {value!r}; expected a finite number")
        constants[name] = float(value)
    if "norm_groups" in constants:
        groups = constants["norm_groups"]
        if groups != int(groups) or groups < 1:
            raise CheckpointError(
                source.origin, f"the config's norm_num_groups is {groups!r}; expected a positive integer"
            )
        constants["norm_groups"] = int(groups)
    if constants.get("scale_factor") == 0:
        raise CheckpointError(source.origin, "the config's scaling_factor is 0; the latent cannot be scaled by it")
    return constants


def _not_a_vae_hint(keys: list[str]) -> str:
    if any(re.search(r"(^|\.)input_blocks\.\d+\.", k) for k in keys) or any(k.startswith("down_blocks.") for k in keys):
        return "this is a UNet (SD1.x/SDXL family), not a VAE"
    transformer = (
        "double_blocks.",
        "single_blocks.",
        "model.diffusion_model.",
        "diffusion_model.",
        "transformer_blocks.",
        "single_transformer_blocks.",
        "img_in.",
        "x_embedder.",
    )
    if any(k.startswith(transformer) for k in keys):
        return "this is a diffusion transformer (load it with load_transformer), not a VAE"
    if any(".SelfAttention." in k or k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "this is a T5 text encoder (load it with load_text_encoder), not a VAE"
    if any(k.startswith("text_model.") or "token_embedding" in k for k in keys):
        return "this is a CLIP text encoder (load it with load_text_encoder), not a VAE"
    return "no VAE tensors (encoder.conv_in, decoder.conv_in, …) found: this is not a FLUX VAE"


def _vae_folder(path: Path) -> Path:
    """A diffusers pipeline folder stands for its `vae/` subfolder."""
    if path.is_dir() and (path / "vae").is_dir() and not any(path.glob("*.safetensors")):
        return path / "vae"
    return path


def load_vae(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> AutoEncoder:
    """The FLUX VAE from a BFL file, a diffusers `vae/` folder or a full checkpoint with a VAE prefix.

    Built on `meta` and filled from the memory-mapped file; `dtype=None` keeps the file's precision.
    Widths and depths come from the tensors; scale/shift and the GroupNorm groups from a diffusers
    `config.json` or a `config` JSON in the file's metadata, else FLUX's 0.3611 / 0.1159 and 32.
    """
    path = _vae_folder(Path(path))
    source = open_tensors(path)
    keys = source.keys()
    folder_config = read_config_json(path) if path.is_dir() else None
    names = vae_names(keys)
    if not names:
        raise CheckpointError(path, _not_a_vae_hint(keys))

    def shape_of(ours: str) -> tuple[int, ...]:
        shape = source.shape(names[ours])
        # diffusers keeps the attention projections as Linear [C, C]; BFL as 1×1 convs [C, C, 1, 1]
        return (*shape, 1, 1) if is_attention_projection(ours) and len(shape) == 2 else shape

    shapes = {k: shape_of(k) for k in names}
    params = vae_params_from_shapes(shapes, path)
    for key, value in _config_constants(source, folder_config).items():
        setattr(params, key, value)
    check_norm_groups(params, path)

    def get(ours: str) -> torch.Tensor:
        return source.tensor(names[ours]).reshape(shapes[ours])

    with torch.device("meta"):
        vae = AutoEncoder(params)
    assign_tensors(vae, shapes, get, path, device=device, dtype=dtype, what="FLUX VAE")
    ensure_materialized(vae, path)
    return vae.eval().requires_grad_(False)
