"""Our Flux against diffusers' FluxTransformer2DModel with the same random weights."""

from __future__ import annotations

import pytest
import torch

from kontext_core.config import FluxParams
from kontext_core.model import Flux
from kontext_core.sampling import pack, position_ids, reference_tokens

from tiny_models import TINY_FLUX, tiny_flux_model

diffusers = pytest.importorskip("diffusers")


def bfl_to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL → diffusers names, written here from diffusers' module tree so the test does not trust the engine's
    own converter (diffusers' single-file converter hard-codes the 12B width and cannot take a tiny model)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    double = {
        "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
        "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    }
    single = {
        "linear2": "proj_out", "modulation.lin": "norm.linear",
        "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
    }
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "double_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            base = f"transformer_blocks.{i}."
            if rest.startswith(("img_attn.qkv", "txt_attn.qkv")):
                names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, chunk in zip(names, value.chunk(3)):
                    out[f"{base}attn.{name}.{parts[-1]}"] = chunk
                continue
            stem = next(k for k in double if rest.startswith(k))
            out[base + double[stem] + rest[len(stem):]] = value
        elif parts[0] == "single_blocks":
            i, rest = parts[1], ".".join(parts[2:])
            base = f"single_transformer_blocks.{i}."
            if rest.startswith("linear1"):
                sizes = [hidden, hidden, hidden, value.shape[0] - 3 * hidden]
                for name, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), value.split(sizes)):
                    out[f"{base}{name}.{parts[-1]}"] = chunk
                continue
            stem = next(k for k in single if rest.startswith(k))
            out[base + single[stem] + rest[len(stem):]] = value
        elif key.startswith("final_layer.adaLN_modulation.1"):
            shift, scale = value.chunk(2)  # BFL stores (shift, scale), diffusers (scale, shift)
            out["norm_out.linear." + parts[-1]] = torch.cat((scale, shift))
        else:
            stem = ".".join(parts[:-1])
            out[simple[stem] + "." + parts[-1]] = value
    return out


def diffusers_twin(model: Flux) -> torch.nn.Module:
    p = model.params
    twin = diffusers.FluxTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim),
    )  # fmt: skip
    twin.load_state_dict(bfl_to_diffusers(model.state_dict(), p.hidden_size), strict=True)
    return twin.eval()


def kontext_inputs(params: FluxParams, batch: int = 2, seed: int = 1):
    """Non-square target (6×10 latent tokens) and a reference of another shape, as a Kontext edit sends."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, 16, 12, 20, generator=gen)
    reference = torch.randn(1, 16, 16, 8, generator=gen)
    ref_tok, ref_ids = reference_tokens([reference], (12, 20), "offset")
    img = torch.cat((pack(target), ref_tok.expand(batch, -1, -1)), dim=1)
    img_ids = torch.cat((position_ids(6, 10), ref_ids))[None].expand(batch, -1, -1)
    txt = torch.randn(batch, 7, params.context_in_dim, generator=gen)
    txt_ids = torch.zeros(batch, 7, 3)
    y = torch.randn(batch, params.vec_in_dim, generator=gen)
    t = torch.tensor([0.83, 0.27])[:batch]
    guidance = torch.tensor([2.5, 4.0])[:batch]
    return img, img_ids, txt, txt_ids, t, y, guidance


@torch.no_grad()
def test_forward_matches_diffusers_fp32():
    model = tiny_flux_model(seed=3)
    twin = diffusers_twin(model)
    img, img_ids, txt, txt_ids, t, y, guidance = kontext_inputs(model.params)
    ours = model(img, img_ids, txt, txt_ids, t, y, guidance)
    theirs = twin(
        hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
        img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False,
    )[0]  # fmt: skip
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"transformer fp32 max abs error vs diffusers: {err:.3e} (output max {scale:.3f})")
    assert ours.shape == (2, img.shape[1], 64)
    assert err <= 1e-5


@torch.no_grad()
def test_forward_without_guidance_embedding():
    params = FluxParams(**{**TINY_FLUX.__dict__, "guidance_embed": False, "depth": 1, "depth_single_blocks": 1})
    model = tiny_flux_model(seed=4, params=params)
    twin = diffusers_twin(model)
    img, img_ids, txt, txt_ids, t, y, _ = kontext_inputs(params, batch=1)
    ours = model(img, img_ids, txt, txt_ids, t, y)
    theirs = twin(
        hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
        img_ids=img_ids[0], txt_ids=txt_ids[0], return_dict=False,
    )[0]  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_guidance_distilled_model_requires_guidance(tiny_flux):
    img, img_ids, txt, txt_ids, t, y, _ = kontext_inputs(tiny_flux.params, batch=1)
    with pytest.raises(ValueError, match="guidance"):
        tiny_flux(img, img_ids, txt, txt_ids, t, y)


@torch.no_grad()
def test_bf16_forward_close_to_fp32(tiny_flux):
    img, img_ids, txt, txt_ids, t, y, guidance = kontext_inputs(tiny_flux.params)
    ref = tiny_flux(img, img_ids, txt, txt_ids, t, y, guidance)
    low = tiny_flux.to(torch.bfloat16)(img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, t, y.bfloat16(), guidance)
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert low.dtype == torch.bfloat16
    assert rel < 3e-2, rel
