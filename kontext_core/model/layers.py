"""The blocks of the FLUX DiT. Module names are the BFL checkpoint keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from kontext_core.model.flux_math import apply_rope, rope, scaled_dot_product
from kontext_core.model.reference_cache import ReferenceKV

__all__ = [
    "DoubleStreamBlock",
    "EmbedND",
    "LastLayer",
    "MLPEmbedder",
    "Modulation",
    "QKNorm",
    "RMSNorm",
    "SelfAttention",
    "SingleStreamBlock",
]


def attend(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, ref_kv: ReferenceKV | None, attention: str) -> Tensor:
    """RoPE, then attention on the `attention` kernel; `ref_kv` records or supplies the reference tokens' K/V."""
    q, k = apply_rope(q, k, pe)
    if ref_kv is not None:
        k, v = ref_kv.extend(k, v)
    return scaled_dot_product(q, k, v, attention)


class EmbedND(nn.Module):
    """RoPE rotations for ids with one position per axis (index, h, w)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale.to(x_dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalized q, k and v as B H L D."""
        return split_heads(self.qkv(x), self.num_heads, self.norm)


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """A fused B L (3 H D) projection → q, k, v as B H L D, with q and k RMS-normalized."""
    q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=num_heads)
    q, k = norm(q, k, v)
    return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    return (1 + mod.scale) * x + mod.shift


def mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        ref_kv: ReferenceKV | None = None,
        attention: str = "sdpa",
    ) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_mod1))

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attend(q, k, v, pe, ref_kv, attention)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(modulate(self.img_norm2(img), img_mod2))

        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """A DiT block with parallel attention and MLP (arXiv:2302.05442), one stream for text and image."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(
        self, x: Tensor, vec: Tensor, pe: Tensor, ref_kv: ReferenceKV | None = None, attention: str = "sdpa"
    ) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(modulate(self.pre_norm(x), mod)), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads, self.norm)
        attn = attend(q, k, v, pe, ref_kv, attention)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
