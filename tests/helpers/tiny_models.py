"""Tiny random models, every parameter randomized, built the way the real ones are."""

from __future__ import annotations

import dataclasses

import torch

from kontext_core.model.config import FLUX_KONTEXT_DEV, FluxParams
from kontext_core.model.flux import Flux

# hidden 64 = 4 heads of 16; axes (4, 6, 6) is the default rule at head dim 16.
_TINY_WIDTHS = {"hidden_size": 64, "num_heads": 4, "axes_dim": [4, 6, 6], "vec_in_dim": 24, "context_in_dim": 40}
TINY_FLUX = dataclasses.replace(FLUX_KONTEXT_DEV, depth=2, depth_single_blocks=2, **_TINY_WIDTHS)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter and buffer random, so swapped scales/shifts or halves cannot hide behind ones/zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std)
    return module


def tiny_flux_model(seed: int = 0, params: FluxParams = TINY_FLUX) -> Flux:
    return randomize_(Flux(params), seed).eval()
