"""diffusers `FluxTransformer2DModel` names → BFL names, one tensor at a time.

Most tensors are a rename. Fused BFL tensors (qkv, single-block linear1) are concatenations of
diffusers tensors, and the final modulation stores its halves in the opposite order, so each BFL key
maps to a recipe: the diffusers keys to read and how to join them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

TOP_LEVEL_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
DOUBLE_BLOCK_RENAMES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE_BLOCK_RENAMES = {
    "proj_out": "linear2",
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
FUSED_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
FUSED_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


@dataclass(frozen=True)
class Recipe:
    """How one BFL tensor is made from diffusers tensors."""

    parts: tuple[str, ...]
    swap_halves: bool = False

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        tensors = [read(p) for p in self.parts]
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if self.swap_halves:
            first, second = t.chunk(2, dim=0)
            t = torch.cat((second, first), dim=0)
        return t


def is_diffusers_flux(keys: list[str]) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def diffusers_recipes(keys: list[str]) -> dict[str, Recipe]:
    """BFL key → recipe, for every tensor the diffusers keys describe."""
    recipes: dict[str, Recipe] = {}
    have = set(keys)
    for key in keys:
        stem, _, param = key.rpartition(".")
        if stem == "norm_out.linear":
            recipes[f"final_layer.adaLN_modulation.1.{param}"] = Recipe((key,), swap_halves=True)
        elif stem in TOP_LEVEL_RENAMES:
            recipes[f"{TOP_LEVEL_RENAMES[stem]}.{param}"] = Recipe((key,))
        elif m := re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", stem):
            kind, index, inner = m.groups()
            renames, fused, prefix = (
                (DOUBLE_BLOCK_RENAMES, FUSED_DOUBLE, f"double_blocks.{index}.")
                if kind == "transformer_blocks"
                else (SINGLE_BLOCK_RENAMES, FUSED_SINGLE, f"single_blocks.{index}.")
            )
            if inner in renames:
                target = renames[inner]
                # RMSNorm weights are `weight` in diffusers and `scale` in BFL
                param = "scale" if target.endswith(("query_norm", "key_norm")) else param
                recipes[f"{prefix}{target}.{param}"] = Recipe((key,))
                continue
            for target, sources in fused.items():
                if inner == sources[0]:
                    parts = tuple(f"{kind}.{index}.{s}.{param}" for s in sources)
                    if all(p in have for p in parts):
                        recipes[f"{prefix}{target}.{param}"] = Recipe(parts)
    return recipes


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole diffusers state dict in BFL names (for tests and tools; loading goes tensor by tensor)."""
    return {k: r.build(state.__getitem__) for k, r in diffusers_recipes(list(state)).items()}


def recipe_shape(recipe: Recipe, shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    shapes = [shape_of(p) for p in recipe.parts]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def unused_keys(keys: list[str], recipes: dict[str, Recipe]) -> list[str]:
    """diffusers keys that no recipe reads: a layout this converter does not know."""
    used = {p for r in recipes.values() for p in r.parts}
    return sorted(k for k in keys if k not in used)
