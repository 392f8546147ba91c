"""Which tokens each rank holds: every segment (text, target, references) padded to a multiple of the rank
count and cut into equal chunks, so every rank holds the same number of tokens and collectives stay even."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class ShardLayout:
    """Segments of `lengths` tokens split over `ranks`: rank r holds chunk r of each segment, in segment order.

    Pads sit at the end of each segment, so they fall on the last ranks; they are zeros going in and are
    dropped from the keys of attention (`kept`) and from the gathered result (`gather`).
    """

    def __init__(self, lengths: Sequence[int], ranks: int):
        self.lengths = list(lengths)
        self.ranks = ranks
        self.chunks = [math.ceil(n / ranks) for n in self.lengths]

    @property
    def local_length(self) -> int:
        return sum(self.chunks)

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """Rank `rank`'s chunks of `x`, whose `dim` holds the segments one after another."""
        if x.shape[dim] != sum(self.lengths):
            raise ValueError(f"expected {sum(self.lengths)} tokens along dim {dim}, got {x.shape[dim]}")
        pieces = []
        for segment, chunk in zip(x.split(self.lengths, dim), self.chunks):
            pad = chunk * self.ranks - segment.shape[dim]
            if pad:
                shape = list(segment.shape)
                shape[dim] = pad
                segment = torch.cat((segment, segment.new_zeros(shape)), dim)
            pieces.append(segment.narrow(dim, rank * chunk, chunk))
        return torch.cat(pieces, dim)

    def gather(self, shards: Sequence[Tensor], dim: int = 1) -> Tensor:
        """The whole tensor back from every rank's shard (rank order), pads dropped."""
        pieces = [shard.split(self.chunks, dim) for shard in shards]
        segments = [torch.cat([p[s] for p in pieces], dim).narrow(dim, 0, n) for s, n in enumerate(self.lengths)]
        return torch.cat(segments, dim)

    def valid(self, rank: int) -> Tensor:
        """Which of rank `rank`'s local tokens are real (not pads)."""
        return torch.cat([torch.arange(chunk) + rank * chunk < n for n, chunk in zip(self.lengths, self.chunks)])

    def kept(self, device: torch.device) -> Tensor | None:
        """Indices of the real tokens in all ranks' shards laid end to end (rank order), None if there is no pad."""
        mask = torch.cat([self.valid(r) for r in range(self.ranks)])
        return None if bool(mask.all()) else mask.nonzero().squeeze(1).to(device)

    def kept_on(self, rank: int, device: torch.device) -> Tensor | None:
        """Indices of the real tokens among rank `rank`'s local tokens, None if it holds no pad."""
        mask = self.valid(rank)
        return None if bool(mask.all()) else mask.nonzero().squeeze(1).to(device)


def joined(*layouts: ShardLayout) -> ShardLayout:
    """One layout of the segments of several, in order: e.g. the text's and the image's, as attention sees them."""
    return ShardLayout([n for layout in layouts for n in layout.lengths], layouts[0].ranks)
