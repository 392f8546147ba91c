"""diffusers' own FLUX Kontext parts, configured as the published files are: the references parity tests run."""

from __future__ import annotations

import diffusers
import torch

# FLUX's VAE latent normalization, from the published VAE config
VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159

# FlowMatchEulerDiscreteScheduler's config as FLUX.1 Kontext [dev]'s scheduler/ folder ships it
KONTEXT_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True
)


def flux_like_kl(
    widths: tuple[int, ...],
    layers: int,
    scaling_factor: float = VAE_SCALE,
    shift_factor: float = VAE_SHIFT,
    groups: int = 32,
) -> torch.nn.Module:
    """diffusers' AutoencoderKL configured as FLUX's VAE (16 channels, no quant convs)."""
    levels = len(widths)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels}
    normalization = dict(scaling_factor=scaling_factor, shift_factor=shift_factor)
    no_quant_convs = dict(use_quant_conv=False, use_post_quant_conv=False)
    layout = dict(block_out_channels=widths, layers_per_block=layers, norm_num_groups=groups)
    return diffusers.AutoencoderKL(latent_channels=16, **layout, **blocks, **no_quant_convs, **normalization)


def kontext_pipeline(transformer: torch.nn.Module, vae_kl: torch.nn.Module) -> diffusers.FluxKontextPipeline:
    """diffusers' FluxKontextPipeline without text encoders: callers pass prompt embeddings."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER)
    no_text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = diffusers.FluxKontextPipeline(scheduler=scheduler, vae=vae_kl, transformer=transformer, **no_text)
    pipe.set_progress_bar_config(disable=True)
    return pipe
