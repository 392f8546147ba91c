"""Every transformer file layout loads to the same model; the real layout matches the manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_FLUX, tiny_flux_model

from kontext_core import load_transformer
from kontext_core.checkpoints.flux_diffusers import diffusers_recipes, diffusers_to_bfl, recipe_shape
from kontext_core.config import FluxParams
from kontext_core.model import Flux
from kontext_core.quant import Fp8Linear
from kontext_core.sampling import position_ids

DATA = Path(__file__).parent / "data"


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    rows = (DATA / name).read_text().splitlines()[1:]
    return {k: tuple(int(x) for x in s.strip("[]").split(",") if x.strip()) for k, s, *_ in (r.split("\t") for r in rows)}


def inputs(params: FluxParams, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 12, 64, generator=gen)
    return (
        img, position_ids(3, 4)[None], torch.randn(1, 5, params.context_in_dim, generator=gen), torch.zeros(1, 5, 3),
        torch.tensor([0.6]), torch.randn(1, params.vec_in_dim, generator=gen), torch.tensor([2.5]),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    model = tiny_flux_model(seed=21)
    with torch.no_grad():
        out = model(*inputs(model.params))
    return model, out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale: fp32 round-off is ~1e-7 of it per op."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def save_state(path: Path, state: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


@torch.no_grad()
def test_bfl_fp32_file_is_exact(reference, tmp_path):
    model, expected = reference
    loaded = load_transformer(save_state(tmp_path / "flux.safetensors", model.state_dict()))
    assert loaded.params == model.params
    assert torch.equal(loaded(*inputs(model.params)), expected)


@torch.no_grad()
def test_comfyui_prefixed_full_checkpoint(reference, tmp_path):
    model, expected = reference
    state = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2, 3, 3)  # other models in the same file
    loaded = load_transformer(save_state(tmp_path / "full.safetensors", state))
    assert torch.equal(loaded(*inputs(model.params)), expected)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@torch.no_grad()
def test_half_precision_files(reference, tmp_path, dtype, tol):
    model, expected = reference
    path = save_state(tmp_path / "half.safetensors", {k: v.to(dtype) for k, v in model.state_dict().items()})
    kept = load_transformer(path)
    assert kept.img_in.weight.dtype == dtype and kept.compute_dtype == dtype
    upcast = load_transformer(path, dtype=torch.float32)
    out = upcast(*inputs(model.params))
    rel = ((out - expected).norm() / expected.norm()).item()
    print(f"{dtype} file, fp32 compute: rel-L2 {rel:.2e}")
    assert rel < tol


def _quantize(w: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / torch.finfo(fp8).max
    return (w / scale).to(fp8), scale


def _scaled_fp8_state(model: Flux, form: str) -> tuple[dict, dict, dict]:
    """A ComfyUI scaled-fp8 file: block Linear weights in fp8 with a scale each; the dequantized twin."""
    state, dequantized, metadata = {}, {}, {}
    layers = {}
    for key, value in model.state_dict().items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and value.ndim == 2:
            q, scale = _quantize(value, torch.float8_e4m3fn)
            layer = key[: -len(".weight")]
            state[key] = q
            state[f"{layer}.scale_weight" if form == "scale_weight" else f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": "float8_e4m3fn"}
            dequantized[key] = q.float() * scale
        else:
            state[key] = value
            dequantized[key] = value
    if form == "scale_weight":
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return state, dequantized, metadata


@pytest.mark.parametrize("form", ["scale_weight", "weight_scale"])
@torch.no_grad()
def test_scaled_fp8_matches_dequantized_reference(reference, tmp_path, form):
    model, expected = reference
    state, dequantized, metadata = _scaled_fp8_state(model, form)
    path = save_state(tmp_path / "fp8_scaled.safetensors", state, metadata)
    twin = Flux(model.params)
    twin.load_state_dict(dequantized)
    twin_out = twin(*inputs(model.params))

    full = load_transformer(path, dtype=torch.float32)  # dequantized at load
    assert max_rel(full(*inputs(model.params)), twin_out) <= 1e-5

    kept = load_transformer(path, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)  # stays fp8
    assert isinstance(kept.double_blocks[0].img_attn.qkv, Fp8Linear)
    assert kept.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert max_rel(kept(*inputs(model.params)), twin_out) <= 1e-5
    rel = ((twin_out - expected).norm() / expected.norm()).item()
    print(f"scaled fp8 ({form}) vs full precision: rel-L2 {rel:.3e}")
    assert 0 < rel < 0.1


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@torch.no_grad()
def test_plain_fp8_stays_fp8_by_default(reference, tmp_path, fp8):
    model, expected = reference
    state = {k: (v.to(fp8) if k.startswith("double_blocks.") and v.ndim == 2 else v) for k, v in model.state_dict().items()}
    path = save_state(tmp_path / "fp8.safetensors", state)
    kept = load_transformer(path)  # dtype=None: keep the file's precision
    assert kept.double_blocks[0].img_mlp[0].weight.dtype == fp8
    assert kept.compute_dtype == torch.bfloat16
    twin = Flux(model.params)
    twin.load_state_dict({k: v.float() for k, v in state.items()})
    out = load_transformer(path, dtype=torch.float32)(*inputs(model.params))
    assert max_rel(out, twin(*inputs(model.params))) <= 1e-5
    low = kept(*[t.bfloat16() if t.is_floating_point() and i in (0, 2, 5) else t for i, t in enumerate(inputs(model.params))])
    assert low.dtype == torch.bfloat16
    print(f"{fp8} plain file vs full precision: rel-L2 {((out - expected).norm() / expected.norm()).item():.3e}")


@torch.no_grad()
def test_diffusers_folder_sharded(reference, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from reference_mappings import diffusers_twin

    model, expected = reference
    twin = diffusers_twin(model)
    twin.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_transformer(tmp_path / "transformer")
    assert loaded.params.axes_dim == list(twin.config.axes_dims_rope)
    assert max_rel(loaded(*inputs(model.params)), expected) <= 1e-5
    assert diffusers is not None


def test_diffusers_to_bfl_inverts_the_test_mapping(reference):
    from reference_mappings import bfl_to_diffusers

    model, _ = reference
    state = model.state_dict()
    back = diffusers_to_bfl(bfl_to_diffusers(state, model.params.hidden_size))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_real_config_matches_bfl_manifest():
    with torch.device("meta"):
        model = Flux(FluxParams())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == read_manifest("flux_kontext_dev_keys.tsv")
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320


def test_diffusers_manifest_converts_to_bfl_manifest():
    theirs = read_manifest("flux_kontext_dev_keys_diffusers.tsv")
    recipes = diffusers_recipes(list(theirs))
    assert {k: recipe_shape(r, theirs.__getitem__) for k, r in recipes.items()} == read_manifest("flux_kontext_dev_keys.tsv")


def test_real_width_one_block_each_matches_manifest_rows():
    params = FluxParams(depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        model = Flux(params)
    manifest = read_manifest("flux_kontext_dev_keys.tsv")
    rows = {k: v for k, v in manifest.items() if not re.match(r"(double|single)_blocks\.([1-9]|\d\d)", k)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == rows


@torch.no_grad()
def test_config_from_metadata_and_axes(reference, tmp_path):
    model, expected = reference
    meta = {"flux_params": json.dumps(TINY_FLUX.__dict__)}
    loaded = load_transformer(save_state(tmp_path / "m.safetensors", model.state_dict(), meta))
    assert loaded.params == TINY_FLUX
    other = load_transformer(tmp_path / "m.safetensors", axes_dim=[2, 8, 6])
    assert other.params.axes_dim == [4, 6, 6]  # the file's own flux_params win over a guess


