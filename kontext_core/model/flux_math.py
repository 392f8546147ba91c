"""Attention with 3-axis RoPE, one dispatch point for every kernel, and the timestep embedding."""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage")

# Attention in place of a named backend: B H L D queries, keys, values → B L (H D), e.g. across processes
AttentionKernel = Callable[[Tensor, Tensor, Tensor], Tensor]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (default: CUDA if present) with what is installed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    found = ["sdpa"]
    if device.type == "cuda":
        if _flash_module() is not None:
            found.append("flash")
        if importlib.util.find_spec("sageattention") is not None:
            found.append("sage")
    return found


def check_backend_name(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


@functools.cache
def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> str:
    """The kernel that runs for backend `name` on tensors of `dtype` on a `device_type` device ("auto" chooses).

    Cached: what is installed does not change while a process runs, and a model asks once per forward.
    """
    usable = available_backends(torch.device(device_type))
    if check_backend_name(name) == "auto":
        # FlashAttention only takes half precision; for fp32 SDPA is the exact path.
        if "flash" in usable and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "sdpa"
    if name not in usable:
        raise RuntimeError(
            f"attention backend {name!r} is not available on {device_type} "
            f"(available: {', '.join(usable)}); install it or choose 'auto'"
        )
    return name


@functools.cache
def _flash_module():
    # FlashAttention-3 (Hopper) ships as flash_attn_interface; FA2 as flash_attn.
    for name in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    return None


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor, backend: str | AttentionKernel = "sdpa") -> Tensor:
    """softmax(q kᵀ/√d) v for B H L D tensors on a resolved `backend` (see `resolve_backend`) or an
    `AttentionKernel`; returns B L (H D)."""
    if callable(backend):
        return backend(q, k, v)
    if backend == "flash":
        out = _flash_module().flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return rearrange(out, "B L H D -> B L (H D)")
    if backend == "sage":
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for positions `pos` on one axis."""
    if dim % 2:
        raise ValueError(f"RoPE axis width must be even, got {dim}")
    # float64 as BFL computes it; MPS has no float64, so there (as in ComfyUI) float32
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = torch.einsum("...n,d->...nd", pos.to(wide), omega)
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate adjacent channel pairs (2i, 2i+1) of q and k; computed in fp32 whatever the input dtype."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled ×1000, as BFL), cos half first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding
