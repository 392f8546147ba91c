"""Reading model files: safetensors only, every format a ComfyUI user has, converted to BFL names."""

from kontext_core.checkpoints.autoencoder import is_vae_checkpoint, load_vae
from kontext_core.checkpoints.safetensors_io import CheckpointError, TensorSource, open_tensors, read_header
from kontext_core.checkpoints.transformer import (
    diffusers_to_bfl,
    flux_params_from_tensors,
    load_transformer,
    stored_fp8_dtype,
)

__all__ = [
    "CheckpointError",
    "TensorSource",
    "diffusers_to_bfl",
    "flux_params_from_tensors",
    "is_vae_checkpoint",
    "load_transformer",
    "load_vae",
    "open_tensors",
    "read_header",
    "stored_fp8_dtype",
]
