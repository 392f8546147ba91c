"""Every transformer file layout loads to the same model; the real layout matches the manifests."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from tests.helpers.flux_files import (
    bfl_file,
    diffusers_folder,
    flux_inputs,
    model_from_state,
    plain_fp8_file,
    read_manifest,
    save_state,
    scaled_fp8_file,
)
from tests.helpers.metrics import max_rel, rel_l2
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

from kontext_core import load_transformer
from kontext_core.checkpoints import stored_fp8_dtype
from kontext_core.checkpoints.flux_diffusers import diffusers_recipes, recipe_shape
from kontext_core.checkpoints.transformer import diffusers_to_bfl, flux_params_from_tensors
from kontext_core.model.config import FLUX_KONTEXT_DEV, FluxParams
from kontext_core.model.flux import Flux
from kontext_core.runtime.quant import Fp8Linear, enable_fp8_matmul, fp8_matmul_supported


@pytest.fixture(scope="module")
def reference():
    model = tiny_flux_model(seed=21)
    with torch.no_grad():
        out = model(*flux_inputs(model.params))
    return model, out


@torch.no_grad()
def test_bfl_fp32_file_is_exact(reference, tmp_path):
    model, expected = reference
    loaded = load_transformer(bfl_file(model, tmp_path / "flux.safetensors"))
    assert loaded.params == model.params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    # bit-equal weights; the output may differ by round-off where the file's alignment picks other SIMD paths
    assert max_rel(loaded(*flux_inputs(model.params)), expected) <= 1e-6


@torch.no_grad()
def test_comfyui_prefixed_full_checkpoint(reference, tmp_path):
    model, expected = reference
    state = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(2, 2, 3, 3)  # other models in the same file
    loaded = load_transformer(save_state(tmp_path / "full.safetensors", state))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert max_rel(loaded(*flux_inputs(model.params)), expected) <= 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@torch.no_grad()
def test_half_precision_files(reference, tmp_path, dtype, tol):
    model, expected = reference
    path = bfl_file(model, tmp_path / "half.safetensors", dtype)
    kept = load_transformer(path)
    assert kept.img_in.weight.dtype == dtype and kept.compute_dtype == dtype
    upcast = load_transformer(path, dtype=torch.float32)
    assert upcast.img_in.weight.dtype == torch.float32
    # the same weights, rounded to the file's precision: fp32 compute matches them to round-off
    twin = model_from_state(model.params, {k: v.to(dtype) for k, v in model.state_dict().items()})
    out = upcast(*flux_inputs(model.params))
    assert max_rel(out, twin(*flux_inputs(model.params))) <= 1e-5
    rel = rel_l2(out, expected)
    print(f"{dtype} file, fp32 compute: rel-L2 vs fp32 weights {rel:.2e}")
    assert rel < tol


@pytest.mark.parametrize("form", ["scale_weight", "weight_scale", "comfy_quant"])
@torch.no_grad()
def test_scaled_fp8_matches_dequantized_reference(reference, tmp_path, form):
    model, expected = reference
    path, dequantized = scaled_fp8_file(model, tmp_path / "fp8_scaled.safetensors", form)
    twin_out = model_from_state(model.params, dequantized)(*flux_inputs(model.params))

    full = load_transformer(path, dtype=torch.float32)  # dequantized at load
    assert full.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    assert max_rel(full(*flux_inputs(model.params)), twin_out) <= 1e-5

    assert stored_fp8_dtype(path) == torch.float8_e4m3fn
    kept = load_transformer(path, dtype=torch.float32, weight_dtype=stored_fp8_dtype(path))  # stays fp8
    qkv = kept.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert max_rel(kept(*flux_inputs(model.params)), twin_out) <= 1e-5
    assert {k for k in kept.state_dict() if not k.endswith(".scale_weight")} == set(model.state_dict())

    default = load_transformer(path)  # dtype=None: the file's precision, computing in bf16
    assert isinstance(default.single_blocks[1].linear1, Fp8Linear) and default.compute_dtype == torch.bfloat16
    rel = rel_l2(twin_out, expected)
    print(f"scaled fp8 ({form}) vs full precision: rel-L2 {rel:.3e}")
    assert 0 < rel < 0.1


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@torch.no_grad()
def test_plain_fp8_stays_fp8_by_default(reference, tmp_path, fp8):
    model, expected = reference
    path, dequantized = plain_fp8_file(model, tmp_path / "fp8.safetensors", fp8)
    assert stored_fp8_dtype(path) == fp8
    kept = load_transformer(path)  # dtype=None: keep the file's precision
    assert kept.double_blocks[0].img_mlp[0].weight.dtype == fp8
    assert kept.img_in.weight.dtype == torch.bfloat16  # the rest follows the compute dtype
    assert kept.compute_dtype == torch.bfloat16
    twin_out = model_from_state(model.params, dequantized)(*flux_inputs(model.params))
    out = load_transformer(path, dtype=torch.float32)(*flux_inputs(model.params))
    assert max_rel(out, twin_out) <= 1e-5
    low_inputs = [t.bfloat16() if i in (0, 2, 5) else t for i, t in enumerate(flux_inputs(model.params))]
    low = kept(*low_inputs)
    assert low.dtype == torch.bfloat16
    assert rel_l2(low, twin_out) < 3e-2  # bf16 compute over the same fp8 weights
    print(f"{fp8} plain file vs full precision: rel-L2 {rel_l2(out, expected):.3e}")


@torch.no_grad()
def test_keep_fp8_keeps_exactly_the_layers_the_file_stores_in_fp8(reference, tmp_path):
    """ComfyUI's default weight dtype: a mixed-precision file's 16-bit layers are neither cast nor quantized."""
    model, _ = reference
    fp8_key = "double_blocks.0.img_mlp.0.weight"
    state = {k: v.to(torch.float8_e4m3fn) if k == fp8_key else v for k, v in model.state_dict().items()}
    path = save_state(tmp_path / "mixed.safetensors", state)
    kept = load_transformer(path, dtype=torch.float32, keep_fp8=True)
    fp8 = {name for name, m in kept.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 == {"double_blocks.0.img_mlp.0"} and kept.double_blocks[0].img_mlp[0].weight.dtype == torch.float8_e4m3fn
    twin = model_from_state(model.params, {k: v.float() for k, v in state.items()})
    assert max_rel(kept(*flux_inputs(model.params)), twin(*flux_inputs(model.params))) <= 1e-5


@torch.no_grad()
def test_weight_dtype_fp8_casts_a_full_precision_file(reference, tmp_path):
    model, expected = reference
    path = bfl_file(model, tmp_path / "flux.safetensors")
    assert stored_fp8_dtype(path) is None
    loaded = load_transformer(path, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    assert loaded.single_blocks[0].linear2.weight.dtype == torch.float8_e4m3fn
    assert loaded.txt_in.weight.dtype == torch.float32  # outside the blocks: full precision, as ComfyUI
    rel = rel_l2(loaded(*flux_inputs(model.params)), expected)
    print(f"fp32 file cast to fp8 e4m3 weights: rel-L2 {rel:.3e}")
    assert 0 < rel < 0.2


@torch.no_grad()
def test_diffusers_folder_sharded(reference, tmp_path):
    model, expected = reference
    folder = diffusers_folder(model, tmp_path / "transformer")
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = load_transformer(folder)
    assert loaded.params == model.params
    assert max_rel(loaded(*flux_inputs(model.params)), expected) <= 1e-5


@torch.no_grad()
def test_diffusers_config_axes_are_used(reference, tmp_path):
    model, _ = reference
    folder = diffusers_folder(model, tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [2, 8, 6]}))
    assert load_transformer(folder).params.axes_dim == [2, 8, 6]


def test_diffusers_to_bfl_inverts_the_test_mapping(reference):
    from tests.helpers.reference_mappings import bfl_to_diffusers

    model, _ = reference
    state = model.state_dict()
    back = diffusers_to_bfl(bfl_to_diffusers(state, model.params.hidden_size))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_real_config_matches_bfl_manifest():
    with torch.device("meta"):
        model = Flux(FLUX_KONTEXT_DEV)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == read_manifest("flux_kontext_dev_keys.tsv")
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320
    assert flux_params_from_tensors(state) == FLUX_KONTEXT_DEV  # config inference at full size, on meta


def test_diffusers_manifest_converts_to_bfl_manifest():
    theirs = read_manifest("flux_kontext_dev_keys_diffusers.tsv")
    recipes = diffusers_recipes(list(theirs))
    used = {p for r in recipes.values() for p in r.parts}
    assert used == set(theirs)  # every diffusers tensor lands somewhere
    converted = {k: recipe_shape(r, theirs.__getitem__) for k, r in recipes.items()}
    assert converted == read_manifest("flux_kontext_dev_keys.tsv")
    assert flux_params_from_tensors(converted) == FLUX_KONTEXT_DEV


def test_real_width_one_block_each_matches_manifest_rows():
    params = dataclasses.replace(FLUX_KONTEXT_DEV, depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        model = Flux(params)
    manifest = read_manifest("flux_kontext_dev_keys.tsv")
    rows = {k: v for k, v in manifest.items() if not re.match(r"(double|single)_blocks\.([1-9]|\d\d)", k)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == rows
    assert flux_params_from_tensors(model.state_dict()) == params


def test_config_inference_reads_every_field():
    # every field but in_channels and theta (which no tensor of a Kontext model can change) differs from TINY_FLUX
    widths = {"out_channels": 48, "vec_in_dim": 20, "context_in_dim": 36, "hidden_size": 96, "num_heads": 3}
    switches = {"mlp_ratio": 3.0, "qkv_bias": False, "guidance_embed": False}
    params = dataclasses.replace(TINY_FLUX, depth=3, depth_single_blocks=1, axes_dim=[4, 14, 14], **widths, **switches)
    with torch.device("meta"):
        state = Flux(params).state_dict()
    assert flux_params_from_tensors(state) == params  # head dim 32 → default axes (4, 14, 14)
    assert flux_params_from_tensors(state, axes_dim=[8, 12, 12]).axes_dim == [8, 12, 12]


@torch.no_grad()
def test_config_from_metadata_and_axes(reference, tmp_path):
    model, _ = reference
    meta = {"flux_params": json.dumps(TINY_FLUX.__dict__)}
    loaded = load_transformer(save_state(tmp_path / "m.safetensors", model.state_dict(), meta))
    assert loaded.params == TINY_FLUX
    with pytest.raises(ValueError, match=r"axes_dim=\[2, 8, 6\] contradicts the RoPE axes the file names, \[4, 6, 6\]"):
        load_transformer(tmp_path / "m.safetensors", axes_dim=[2, 8, 6])  # never silently one or the other
    assert load_transformer(tmp_path / "m.safetensors", axes_dim=[4, 6, 6]).params == TINY_FLUX
    plain = load_transformer(bfl_file(model, tmp_path / "p.safetensors"), axes_dim=[2, 8, 6])
    assert plain.params.axes_dim == [2, 8, 6]


@torch.no_grad()
def test_converting_load_does_not_point_into_the_file(reference, tmp_path):
    """A cast load must own its memory: the file can change or go once loaded."""
    model, _ = reference
    path = bfl_file(model, tmp_path / "flux.safetensors", torch.float16)
    loaded = load_transformer(path, dtype=torch.float32)
    before = loaded(*flux_inputs(model.params))
    path.write_bytes(b"\0" * path.stat().st_size)
    assert torch.equal(loaded(*flux_inputs(model.params)), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_scaled_mm_path_on_gpu(tmp_path):
    """fp8 × fp8 matmul (compute capability 8.9+) stays close to upcasting the same fp8 weights."""
    if not fp8_matmul_supported("cuda"):
        pytest.skip("GPU has no fp8 tensor cores (needs compute capability 8.9+)")
    params = FluxParams(**{**TINY_FLUX.__dict__, "hidden_size": 128, "num_heads": 2, "axes_dim": [16, 24, 24]})
    model = tiny_flux_model(seed=5, params=params)
    path, _ = scaled_fp8_file(model, tmp_path / "fp8.safetensors", "scale_weight")
    upcast = load_transformer(path, device="cuda")
    fast = load_transformer(path, device="cuda", fp8_matmul=True)
    inputs = [t.cuda() for t in flux_inputs(params)]
    inputs = [t.bfloat16() if i in (0, 2, 5) else t for i, t in enumerate(inputs)]
    assert enable_fp8_matmul(fast) > 0
    rel = rel_l2(fast(*inputs), upcast(*inputs))
    print(f"_scaled_mm vs per-layer upcast: rel-L2 {rel:.3e}")
    assert 0 < rel < 5e-2  # 0 would mean every layer fell back to upcasting
