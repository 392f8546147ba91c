"""Model configurations as dataclasses, and the resolutions Kontext was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FluxParams:
    """BFL's `FluxParams`: the transformer's shape. Field names match BFL's so a `flux_params` header loads as is.

    No field has a default: a shape is always said in full (`FLUX_KONTEXT_DEV` is the 12B model), so a
    partial config cannot silently become the 12B one.
    """

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# BFL's `configs["flux-dev-kontext"].params`: FLUX.1 Kontext [dev], 12B
FLUX_KONTEXT_DEV = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)


@dataclass(frozen=True)
class LatentFormat:
    """How the VAE's raw latent maps to the transformer's: (raw − shift) · scale. ComfyUI's LATENT is raw."""

    scale_factor: float
    shift_factor: float


# FLUX's 16-channel latent (BFL's AutoEncoderParams, ComfyUI's `latent_formats.Flux`)
FLUX_LATENT = LatentFormat(scale_factor=0.3611, shift_factor=0.1159)


@dataclass
class AutoEncoderParams:
    """BFL's `AutoEncoderParams` for the 16-channel FLUX VAE."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = FLUX_LATENT.scale_factor
    shift_factor: float = FLUX_LATENT.shift_factor
    # GroupNorm groups (diffusers' `norm_num_groups`). FLUX's 32 groups of 4+ channels; a narrow VAE needs
    # fewer, or each group is one channel and normalization erases every channel's mean (flat colours).
    norm_groups: int = 32


def default_axes_dim(head_dim: int) -> list[int]:
    """RoPE axes (index, h, w) for a head width, when no config names them: (16, 56, 56) at 128."""
    a = 2 * ((7 * head_dim) // 32)
    return [head_dim - 2 * a, a, a]


# (width, height) pairs from BFL's `PREFERED_KONTEXT_RESOLUTIONS`.
PREFERRED_KONTEXT_RESOLUTIONS: list[tuple[int, int]] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


def nearest_kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred resolution whose aspect ratio is closest to `width / height` (ties: the first, as BFL)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h
