"""Our Flux against diffusers' FluxTransformer2DModel with the same random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers.flux_files import kontext_inputs
from tests.helpers.reference_mappings import diffusers_forward, diffusers_twin
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model


diffusers = pytest.importorskip("diffusers")


@torch.no_grad()
def test_forward_matches_diffusers_fp32():
    model = tiny_flux_model(seed=3)
    twin = diffusers_twin(model)
    img, img_ids, txt, txt_ids, t, y, guidance = kontext_inputs(model.params)
    ours = model(img, img_ids, txt, txt_ids, t, y, guidance)
    theirs = diffusers_forward(twin, img, img_ids, txt, txt_ids, t, y, guidance)
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"transformer fp32 max abs error vs diffusers: {err:.3e} (output max {scale:.3f})")
    assert ours.shape == (2, img.shape[1], 64)
    assert err <= 1e-5


@torch.no_grad()
def test_forward_without_guidance_embedding():
    params = dataclasses.replace(TINY_FLUX, guidance_embed=False, depth=1, depth_single_blocks=1)
    model = tiny_flux_model(seed=4, params=params)
    twin = diffusers_twin(model)
    img, img_ids, txt, txt_ids, t, y, _ = kontext_inputs(params, batch=1)
    ours = model(img, img_ids, txt, txt_ids, t, y)
    theirs = diffusers_forward(twin, img, img_ids, txt, txt_ids, t, y)
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
