"""A Flux split across processes, usable wherever the sampler takes a Flux: each rank embeds and transforms
its shard of the text, target and reference tokens, attention exchanges what it needs, the result is gathered."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from kontext_core.model.flux import Flux
from kontext_core.model.flux_math import resolve_backend
from kontext_core.model.reference_cache import ReferenceCache
from kontext_core.parallel.attention import RingAttention, UlyssesAttention, check_heads
from kontext_core.parallel.comm import all_gather
from kontext_core.parallel.groups import ParallelPlan
from kontext_core.parallel.layout import ShardLayout, joined
from kontext_core.sampling import Velocity, cfg_mix, true_cfg


class ShardedReferenceCache(ReferenceCache):
    """The fast mode's cache on one rank: the keys and values of this rank's chunk of the reference tokens."""

    def __init__(self, total_tokens: int, ranks: int, num_blocks: int):
        super().__init__(math.ceil(total_tokens / ranks), num_blocks)
        self.total_tokens = total_tokens


class ParallelFlux:
    """`model` (the same weights on every rank) run as one forward over the ranks of `plan`.

    Takes the calls `kontext_core.sampling.sample` makes of a Flux (and `true_cfg`, which with CFG parallel
    runs the prompt's pass on one half of the ranks and the negative prompt's on the other); the model itself,
    its modules and parameter names, are unchanged, so LoRA, fp8 layers and compiled blocks keep working.
    """

    def __init__(self, model: Flux, plan: ParallelPlan):
        if plan.config.sequence_method == "ulysses":
            check_heads(model.num_heads, plan.sequence_degree)
        self.model, self.plan = model, plan

    @property
    def params(self):
        return self.model.params

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def new_reference_cache(self, num_reference_tokens: int) -> ReferenceCache:
        if self.plan.sequence_group is None:
            return self.model.new_reference_cache(num_reference_tokens)
        blocks = len(self.model.double_blocks) + len(self.model.single_blocks)
        return ShardedReferenceCache(num_reference_tokens, self.plan.sequence_degree, blocks)

    def true_cfg(self, cond: Velocity, uncond: Velocity, scale: float) -> Velocity:
        """True CFG; with CFG parallel each half runs one pass and the two velocities are exchanged."""
        if self.plan.cfg_group is None:
            return true_cfg(cond, uncond, scale)
        mine = cond if self.plan.cfg_rank == 0 else uncond

        def guided(x: Tensor, sigma: float, step: int) -> Tensor:
            return cfg_mix(*all_gather(mine(x, sigma, step), self.plan.cfg_group), scale)

        return guided

    def __call__(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        *vectors,
        ref_cache: ReferenceCache | None = None,
    ) -> Tensor:
        """`Flux.forward` (`vectors`: timesteps, y, guidance), its tokens split over the sequence group."""
        if self.plan.sequence_group is None:
            return self.model(img, img_ids, txt, txt_ids, *vectors, ref_cache=ref_cache)
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        ranks, rank = self.plan.sequence_degree, self.plan.sequence_rank
        text = ShardLayout([txt.shape[1]], ranks)
        image, kv_image = self._image_layouts(img.shape[1], ref_cache, ranks)
        tokens = joined(text, image)
        # RoPE from every token's ids, then cut like the tokens: each rank rotates its own queries and keys
        pe = tokens.shard(self.model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)), rank, dim=2)
        img_e, txt_e, vec = self.model.embed_inputs(image.shard(img, rank), text.shard(txt, rank), *vectors)
        out = self.model.transform(img_e, txt_e, vec, pe, ref_cache, self._kernel(joined(text, kv_image), img_e))
        return image.gather(all_gather(out, self.plan.sequence_group))

    def _image_layouts(
        self, num_tokens: int, ref_cache: ReferenceCache | None, ranks: int
    ) -> tuple[ShardLayout, ShardLayout]:
        """The image tokens' layout, and that of the image keys and values attention sees (with cached references).

        With the fast mode's cache the target and the references are chunked apart, so that each rank's
        references are the trailing tokens of its shard: those its cache slot records and later appends.
        """
        if ref_cache is None:
            layout = ShardLayout([num_tokens], ranks)
            return layout, layout
        if not isinstance(ref_cache, ShardedReferenceCache):
            raise TypeError("a split model needs its own reference cache: make it with new_reference_cache")
        refs = ref_cache.total_tokens
        if ref_cache.recording:
            layout = ShardLayout([num_tokens - refs, refs], ranks)
            return layout, layout
        return ShardLayout([num_tokens], ranks), ShardLayout([num_tokens, refs], ranks)

    def _kernel(self, kv_layout: ShardLayout, like: Tensor):
        group, ranks = self.plan.sequence_group, self.plan.sequence_degree
        if self.plan.config.sequence_method == "ring":
            return RingAttention(group, self.plan.sequence_rank, ranks, kv_layout, like.device)
        backend = resolve_backend(self.model.attention_backend, like.device.type, like.dtype)
        return UlyssesAttention(group, ranks, kv_layout, backend, like.device)
