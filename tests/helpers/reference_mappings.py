"""Name mappings written independently of the engine, so parity tests do not trust the engine's own converters."""

from __future__ import annotations

import diffusers
import torch

from kontext_core.model.flux import Flux


def bfl_to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL → diffusers names, written here from diffusers' module tree so the test does not trust the engine's
    own converter (diffusers' single-file converter hard-codes the 12B width and cannot take a tiny model)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    double = {
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    }
    single = {
        "linear2": "proj_out",
        "modulation.lin": "norm.linear",
        "norm.query_norm.scale": "attn.norm_q.weight",
        "norm.key_norm.scale": "attn.norm_k.weight",
    }
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "double_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            base = f"transformer_blocks.{i}."
            if rest.startswith(("img_attn.qkv", "txt_attn.qkv")):
                names = (
                    ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                for name, chunk in zip(names, value.chunk(3)):
                    out[f"{base}attn.{name}.{parts[-1]}"] = chunk
                continue
            stem = next(k for k in double if rest.startswith(k))
            out[base + double[stem] + rest[len(stem) :]] = value
        elif parts[0] == "single_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            base = f"single_transformer_blocks.{i}."
            if rest.startswith("linear1"):
                sizes = [hidden, hidden, hidden, value.shape[0] - 3 * hidden]
                for name, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), value.split(sizes)):
                    out[f"{base}{name}.{parts[-1]}"] = chunk
                continue
            stem = next(k for k in single if rest.startswith(k))
            out[base + single[stem] + rest[len(stem) :]] = value
        elif key.startswith("final_layer.adaLN_modulation.1"):
            shift, scale = value.chunk(2)  # BFL stores (shift, scale), diffusers (scale, shift)
            out["norm_out.linear." + parts[-1]] = torch.cat((scale, shift))
        else:
            stem = ".".join(parts[:-1])
            out[simple[stem] + "." + parts[-1]] = value
    return out


def diffusers_twin(model: Flux, share_weights: bool = False) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel with `model`'s weights: copied, or (`share_weights`, for
    benchmarks of the 12B size) the very same tensors, built on meta so nothing is allocated twice."""
    p = model.params
    with torch.device("meta" if share_weights else "cpu"):
        twin = diffusers.FluxTransformer2DModel(
            in_channels=p.in_channels,
            num_layers=p.depth,
            num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.hidden_size // p.num_heads,
            num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim,
            pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed,
            axes_dims_rope=tuple(p.axes_dim),
        )
    twin.load_state_dict(bfl_to_diffusers(model.state_dict(), p.hidden_size), strict=True, assign=share_weights)
    return twin.eval().requires_grad_(False)


def diffusers_forward(twin: torch.nn.Module, img, img_ids, txt, txt_ids, t, y, guidance=None) -> torch.Tensor:
    """The twin called with BFL's `Flux.forward` arguments (diffusers takes ids without the batch axis)."""
    inputs = {"hidden_states": img, "encoder_hidden_states": txt, "pooled_projections": y, "timestep": t}
    ids = {"img_ids": img_ids[0], "txt_ids": txt_ids[0]}
    conditioning = {} if guidance is None else {"guidance": guidance}
    return twin(**inputs, **ids, **conditioning, return_dict=False)[0]
