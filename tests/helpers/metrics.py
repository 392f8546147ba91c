"""Error metrics for parity tests, each relative to the reference so a tolerance reads as precision."""

from __future__ import annotations

import math

import torch


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale: fp32 round-off is ~1e-7 of it per op."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(test: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the signal; inf when equal."""
    mse = (test.double() - ref.double()).pow(2).mean().item()
    span = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(span**2 / mse)
