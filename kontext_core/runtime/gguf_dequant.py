"""GGML block formats dequantized in torch, on whatever device the blocks are: the arithmetic of llama.cpp's
reference (`gguf.quants.dequantize`), operation for operation in float32, so the values are the same bit for bit.

A tensor of a block type is stored as `[n_blocks, type_size]` bytes (uint8); `dequantize` gives the float32
values of those blocks, `[n_blocks · block_size]` in file order. Every block starts with, or ends on, float16
scales; the K-quants group 256 values in super-blocks of 16 or 8 sub-blocks with 4- or 6-bit sub-scales.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

QK_K = 256  # values in a K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    """A GGML type: `block_size` values stored in `type_size` bytes."""

    name: str
    block_size: int
    type_size: int


BLOCK_FORMATS = {
    f.name: f
    for f in (
        BlockFormat("Q4_0", 32, 18),
        BlockFormat("Q4_1", 32, 20),
        BlockFormat("Q5_0", 32, 22),
        BlockFormat("Q5_1", 32, 24),
        BlockFormat("Q8_0", 32, 34),
        BlockFormat("Q2_K", QK_K, 84),
        BlockFormat("Q3_K", QK_K, 110),
        BlockFormat("Q4_K", QK_K, 144),
        BlockFormat("Q5_K", QK_K, 176),
        BlockFormat("Q6_K", QK_K, 210),
    )
}


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at byte `start` of each block, as float32 `[n, 1]`."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _split_bits(packed: Tensor, group: int, shifts: Sequence[int], mask: int) -> Tensor:
    """Several small fields per byte: each run of `group` bytes gives, for each shift in turn, `group` values
    `(byte >> shift) & mask`; `[n, bytes · len(shifts)]` uint8."""
    # Python-int shifts: no small tensor built (and copied to the GPU) for each layer at each call
    runs = packed.reshape(packed.shape[0], -1, group)
    return torch.stack([(runs >> s) & mask for s in shifts], dim=2).reshape(packed.shape[0], -1)


def _bits_lsb_first(packed: Tensor) -> Tensor:
    """Bit j of a little-endian bit field (Q5_0/Q5_1's `qh`) as value j, `[n, 8 · bytes]` uint8."""
    return _split_bits(packed, 1, range(8), 1)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: Tensor) -> Tensor:
    q = _split_bits(b[:, 2:], 16, (0, 4), 0x0F).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    q = _split_bits(b[:, 4:], 16, (0, 4), 0x0F).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _five_bits(low: Tensor, high: Tensor) -> Tensor:
    return _split_bits(low, 16, (0, 4), 0x0F) | (_bits_lsb_first(high) << 4)


def _q5_0(b: Tensor) -> Tensor:
    q = _five_bits(b[:, 6:], b[:, 2:6]).to(torch.int8) - 16
    return _f16(b, 0) * q.float()


def _q5_1(b: Tensor) -> Tensor:
    q = _five_bits(b[:, 8:], b[:, 4:8]).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _split_bits(b[:, 16:80], 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    # sixteen 6-bit scales: low 4 bits from bytes 0-7 (two per byte), high 2 bits from bytes 8-11 (four per byte)
    low = _split_bits(packed[:, :8], 8, (0, 4), 0x0F)
    high = _split_bits(packed[:, 8:], 4, (0, 2, 4, 6), 0x03)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _split_bits(qs, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _split_bits(hmask, 32, range(8), 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset of -4
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's eight 6-bit sub-block scales and eight 6-bit mins from their 12 bytes."""
    n = packed.shape[0]
    d, m, m_d = packed.reshape(n, 3, 4).unbind(1)
    scale = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, minimum


def _k_affine(b: Tensor, q: Tensor) -> Tensor:
    n = b.shape[0]
    scale, minimum = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * scale.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * minimum.float()).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    return _k_affine(b, _split_bits(b[:, 16:], 32, (0, 4), 0x0F))


def _q5_k(b: Tensor) -> Tensor:
    low = _split_bits(b[:, 48:], 32, (0, 4), 0x0F)
    high = _split_bits(b[:, 16:48], 32, range(8), 1)
    return _k_affine(b, low | (high << 4))


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = _split_bits(b[:, :128], 64, (0, 4), 0x0F)
    qh = _split_bits(b[:, 128:192], 32, (0, 2, 4, 6), 0x03)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    return (d * q).reshape(n, QK_K)


_DEQUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(blocks: Tensor, kind: str) -> Tensor:
    """The float32 values of `blocks` (`[n_blocks, type_size]` uint8) of GGML type `kind`, in file order."""
    fmt = BLOCK_FORMATS.get(kind)
    if fmt is None:
        raise ValueError(f"GGML type {kind!r} has no torch dequantizer here (these do: {', '.join(BLOCK_FORMATS)})")
    if blocks.dtype != torch.uint8 or blocks.ndim != 2 or blocks.shape[1] != fmt.type_size:
        raise ValueError(f"{kind} blocks must be uint8 [n, {fmt.type_size}], got {blocks.dtype} {tuple(blocks.shape)}")
    return _DEQUANTIZERS[kind](blocks).reshape(-1)
