"""Flux: the rectified-flow transformer of FLUX.1 (and Kontext, which has the same layout)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kontext_core.model.config import FluxParams
from kontext_core.model.layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from kontext_core.model.flux_math import AttentionKernel, check_backend_name, resolve_backend, timestep_embedding
from kontext_core.model.reference_cache import ReferenceCache


class Flux(nn.Module):
    """Transformer for flow matching on sequences of 2×2-packed latent tokens."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} must be divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"RoPE axes_dim {params.axes_dim} must sum to the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self._compute_dtype: torch.dtype | None = None
        self._attention_backend = "auto"

    @property
    def attention_backend(self) -> str:
        """The attention kernel this model asks for: "auto" (the fastest exact one here), "sdpa", "flash", "sage"."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        self._attention_backend = check_backend_name(name)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: set by the loader, else the weights' own (bf16 for 1-byte weights)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        dtype = self.img_in.weight.dtype
        return dtype if dtype.itemsize > 1 else torch.bfloat16

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    def new_reference_cache(self, num_reference_tokens: int) -> ReferenceCache:
        return ReferenceCache(num_reference_tokens, len(self.double_blocks) + len(self.single_blocks))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        ref_cache: ReferenceCache | None = None,
    ) -> Tensor:
        """Velocity for `img` tokens. timesteps and guidance are sigmas in [0, 1] (×1000 inside).

        With `ref_cache` recording, the trailing reference tokens of `img` leave their keys and values
        in the cache; when it is not recording, `img` holds no reference tokens and the cached ones
        are attended to instead.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        img, txt, vec = self.embed_inputs(img, txt, timesteps, y, guidance)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attention = resolve_backend(self._attention_backend, img.device.type, img.dtype)
        return self.transform(img, txt, vec, pe, ref_cache, attention)

    def embed_inputs(
        self, img: Tensor, txt: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Image and text tokens in the hidden width, and the modulation vector: each token on its own, so
        `kontext_core.parallel` can embed a shard of the tokens."""
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: pass a guidance strength")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(img.dtype))
        return img, self.txt_in(txt.to(img.dtype)), vec

    def transform(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        ref_cache: ReferenceCache | None,
        attention: str | AttentionKernel,
    ) -> Tensor:
        """The blocks and the final layer on embedded tokens, `pe` the RoPE rotations of [txt, img].

        `attention` is a resolved backend name, or a kernel that attends across processes (`kontext_core.parallel`).
        """
        slots = (
            ref_cache.slots if ref_cache is not None else [None] * (len(self.double_blocks) + len(self.single_blocks))
        )
        for block, slot in zip(self.double_blocks, slots):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, ref_kv=slot, attention=attention)

        x = torch.cat((txt, img), 1)
        for block, slot in zip(self.single_blocks, slots[len(self.double_blocks) :]):
            x = block(x, vec=vec, pe=pe, ref_kv=slot, attention=attention)
        img = x[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)
