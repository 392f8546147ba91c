"""Growing the small transformer (`train_flux.deepen`) and storing it in scaled fp8 (`store_fp8`): the two steps
that let a transformer of twice the blocks be trained on from the shipped one and still fit 5 MiB."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tests.helpers.flux_files import bfl_file, flux_inputs, is_block_linear, save_state
from safetensors import safe_open
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

from kontext_core.checkpoints.transformer import load_transformer
from kontext_core.runtime.quant import quantize_fp8
from kontext_core.small_model.store_fp8 import main as store_main
from kontext_core.small_model.store_fp8 import store_fp8
from kontext_core.small_model.train_flux import deepen

E4M3_MANTISSA_STEP = 2.0**-3  # 3 mantissa bits: rounding moves a normal value by at most half of 2^-3 of itself
E4M3_SUBNORMAL_STEP = 2.0**-9


def test_deepened_model_computes_what_the_model_did_and_its_copies_learn():
    model = tiny_flux_model(seed=3)  # every gate random, so an open copy would change the output
    deeper = deepen(model)
    assert (deeper.params.depth, deeper.params.depth_single_blocks) == (4, 4)
    assert (len(deeper.double_blocks), len(deeper.single_blocks)) == (4, 4)
    inputs = flux_inputs(TINY_FLUX)
    with torch.no_grad():
        assert torch.equal(deeper(*inputs), model(*inputs))
    deeper.train().requires_grad_(True)
    deeper(*inputs).square().mean().backward()
    for copy in (deeper.double_blocks[1].img_mod, deeper.double_blocks[1].txt_mod, deeper.single_blocks[3].modulation):
        assert copy.lin.bias.grad.abs().sum() > 0  # the closed gates get a gradient and open
    # the copies are separate modules, not the originals twice
    assert deeper.single_blocks[0].linear1.weight is not deeper.single_blocks[1].linear1.weight
    assert model.params.depth == 2  # the source model is left as it was


def test_fp8_store_keeps_every_weight_to_fp8_rounding(tmp_path):
    model = tiny_flux_model(seed=4)
    state = {k: v.half() for k, v in model.state_dict().items()}
    source = save_state(tmp_path / "fp16.safetensors", state, {"flux_params": "{}", "training": "run"})
    target = tmp_path / "fp8.safetensors"
    store_fp8(source, target)
    assert target.stat().st_size < 0.6 * source.stat().st_size
    with safe_open(target, "pt") as f:
        assert f.metadata() == {"flux_params": "{}", "training": "run"}
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["scaled_fp8"].dtype == torch.float8_e4m3fn
    for key, original in model.state_dict().items():
        original = original.half().float()
        if not is_block_linear(key, original):
            assert torch.equal(stored[key].float(), original), key
            continue
        assert stored[key].dtype == torch.float8_e4m3fn, key
        scale = stored[key.removesuffix(".weight") + ".scale_weight"]
        assert stored[key].float().abs().max() == torch.finfo(torch.float8_e4m3fn).max  # the range is used
        error = (stored[key].float() * scale - original).abs()
        assert (error <= original.abs() * E4M3_MANTISSA_STEP / 2 + scale * E4M3_SUBNORMAL_STEP / 2 + 1e-12).all(), key


def test_fp8_store_loads_as_a_scaled_fp8_transformer(tmp_path):
    model = tiny_flux_model(seed=5)
    source = save_state(
        tmp_path / "fp16.safetensors",
        {k: v.half() for k, v in model.state_dict().items()},
        {"flux_params": json.dumps(dataclasses.asdict(TINY_FLUX))},
    )
    store_fp8(source, tmp_path / "fp8.safetensors")
    loaded = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    reference = load_transformer(source, dtype=torch.float32)
    for (key, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
        scale = b.abs().max().item() / torch.finfo(torch.float8_e4m3fn).max  # the store's per-tensor scale
        assert torch.allclose(a, b, rtol=E4M3_MANTISSA_STEP / 2, atol=scale * E4M3_SUBNORMAL_STEP / 2 + 1e-12), key
    inputs = flux_inputs(TINY_FLUX)
    with torch.no_grad():
        out, ref = loaded(*inputs), reference(*inputs)
    assert not torch.equal(out, ref)  # the weights did change...
    assert (out - ref).norm() / ref.norm() < 0.1  # ...by fp8 rounding, not wholesale


def test_fp8_store_refuses_what_it_cannot_store(tmp_path, capsys):
    model = tiny_flux_model(seed=6)
    source = bfl_file(model, tmp_path / "fp16.safetensors", dtype=torch.float16)
    store_fp8(source, tmp_path / "fp8.safetensors")
    with pytest.raises(ValueError, match="already holds fp8"):
        store_fp8(tmp_path / "fp8.safetensors", tmp_path / "again.safetensors")
    vae_like = save_state(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(ValueError, match="double_blocks/single_blocks"):
        store_fp8(vae_like, tmp_path / "out.safetensors")
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        store_fp8(tmp_path / "text.safetensors", tmp_path / "out.safetensors")
    with pytest.raises(SystemExit):
        store_main([str(tmp_path / "missing.safetensors"), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert "source:" in err and "is not a file" in err
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("*.partial"))


def test_quantize_fp8_refuses_a_non_fp8_dtype():
    with pytest.raises(ValueError, match="fp8 must be one of"):
        quantize_fp8(torch.ones(2, 2), torch.float16)
