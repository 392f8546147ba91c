"""Model configurations as dataclasses, and the resolutions Kontext was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FluxParams:
    """BFL's `FluxParams`: the transformer's shape. Field names match BFL's so a `flux_params` header loads as is."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
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
