"""Attention over tokens split across the ranks of a sequence group: Ulysses (all-to-all between a split of
the tokens and a split of the heads) and ring attention (keys and values passed around, softmax merged)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from kontext_core.model.flux_math import scaled_dot_product
from kontext_core.parallel.comm import RingPass, all_to_all
from kontext_core.parallel.layout import ShardLayout


def check_heads(num_heads: int, ranks: int) -> None:
    if num_heads % ranks:
        raise ValueError(
            f"Ulysses splits the {num_heads} attention heads across the {ranks} ranks of a sequence group, and "
            f"{num_heads} is not divisible by {ranks}: use --parallel ring (any number of ranks), "
            f"or a number of ranks that divides {num_heads}"
        )


class UlyssesAttention:
    """Each rank holds all heads of its tokens; an all-to-all gives it its H/W heads of every token, plain
    attention runs on `backend`, and a second all-to-all gives the tokens back (DeepSpeed-Ulysses)."""

    def __init__(self, group, ranks: int, kv_layout: ShardLayout, backend: str, device: torch.device):
        self.group, self.ranks, self.backend = group, ranks, backend
        # known before the blocks run, so a compiled block sees no data-dependent shape
        self.kept = kv_layout.kept(device)

    def _to_all_tokens(self, x: Tensor) -> Tensor:
        """[N, B, H, L, D] (this rank's L tokens) → [N, B, H/W, W·L, D] (every rank's tokens, H/W heads)."""
        n, b, h, length, d = x.shape
        sent = x.reshape(n, b, self.ranks, h // self.ranks, length, d).permute(2, 0, 1, 3, 4, 5)
        got = all_to_all(sent, self.group)  # [W (source rank), N, B, H/W, L, D]
        return got.permute(1, 2, 3, 0, 4, 5).reshape(n, b, h // self.ranks, self.ranks * length, d)

    def _to_own_tokens(self, x: Tensor) -> Tensor:
        """[B, W·L, H/W · D] (every token, this rank's heads) → [B, L, H · D] (this rank's tokens, all heads)."""
        b, total, hd = x.shape
        sent = x.reshape(b, self.ranks, total // self.ranks, hd).transpose(0, 1)
        got = all_to_all(sent, self.group)  # [W (head group), B, L, H/W · D]
        return got.permute(1, 2, 0, 3).reshape(b, total // self.ranks, self.ranks * hd)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # heads checked once, by ParallelFlux
        if q.shape[2] == k.shape[2]:
            q, k, v = self._to_all_tokens(torch.stack((q, k, v)))
        else:  # the reference cache appends the references' keys and values: queries are fewer
            (q,) = self._to_all_tokens(q[None])
            k, v = self._to_all_tokens(torch.stack((k, v)))
        if self.kept is not None:  # pad keys must not take part in any softmax; pad queries are dropped later
            k, v = k.index_select(2, self.kept), v.index_select(2, self.kept)
        return self._to_own_tokens(scaled_dot_product(q, k, v, self.backend))


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ/√d) v and the log-sum-exp of each query's scores, in float32."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse), v.float()), lse


class RingAttention:
    """Each rank keeps its queries; the keys and values travel once around the ring of ranks, the next block's
    transfer overlapping this block's attention, and the blocks' softmaxes merge by their log-sum-exp."""

    def __init__(self, group, rank: int, ranks: int, kv_layout: ShardLayout, device: torch.device):
        self.group, self.rank, self.ranks = group, rank, ranks
        self.kept = [kv_layout.kept_on(r, device) for r in range(ranks)]  # each rank's real keys

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kv = torch.stack((k, v))
        out = lse = None
        for step in range(self.ranks):
            ring = RingPass(kv, self.group) if step < self.ranks - 1 else None
            kept = self.kept[(self.rank - step) % self.ranks]
            if kept is None or len(kept):  # a shard of pads only has nothing to attend to
                block = kv if kept is None else kv.index_select(3, kept)  # no copy where there is no pad
                block_out, block_lse = attention_with_lse(q, block[0], block[1])
                if out is None:
                    out, lse = block_out, block_lse
                else:
                    merged = torch.logaddexp(lse, block_lse)
                    out = out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged)
                    lse = merged
            if ring is not None:
                kv = ring.wait()
        return rearrange(out.to(q.dtype), "B H L D -> B L (H D)")
