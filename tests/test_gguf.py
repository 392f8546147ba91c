"""GGUF transformers (ComfyUI-GGUF's layout: BFL names, GGML quant types, reversed dimensions) load as the same model.

The files are written here with the `gguf` package's own writer and quantizers; the weights loaded with
`dequantize=True` must equal its reference dequantization exactly, and the model's outputs those of a model holding
these weights. Blocks kept quantized (the default) are tested in test_gguf_quantized.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers.flux_files import flux_inputs, model_from_state, write_gguf
from tests.helpers.tiny_models import tiny_flux_model

import kontext_core
from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.summary import describe
from kontext_core.checkpoints.safetensors_io import open_tensors

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_quantized_file_loads_as_its_dequantized_weights(tmp_path, prefix):
    model = tiny_flux_model(seed=4)
    expected = write_gguf(tmp_path / "kontext-Q.gguf", model.state_dict(), prefix=prefix)
    source = open_tensors(tmp_path / "kontext-Q.gguf")
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F32", "F16"} <= set(source.quant_types())

    loaded = kontext_core.load_transformer(tmp_path / "kontext-Q.gguf", dtype=torch.float32, dequantize=True)
    assert loaded.params == model.params  # the configuration read from the shapes, as for safetensors
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value.float()), key
    twin = model_from_state(model.params, expected)
    inputs = flux_inputs(model.params)
    assert torch.equal(loaded(*inputs), twin(*inputs))
    # and the quantization itself is what it should be: within one 4-bit step of the original, 1/8 of a block's
    # largest value (Q4_0 spans -8…7 steps, so a value opposite the largest may be clipped by a whole step)
    err = max(((state[k] - v).abs().max() / v.abs().max()).item() for k, v in model.state_dict().items())
    assert 0 < err <= 1 / 8


@torch.no_grad()
def test_k_quants_and_recorded_shapes_reach_the_model_as_the_reference_dequantizes_them(tmp_path):
    rng = np.random.default_rng(0)
    block = gguf.constants.GGML_QUANT_SIZES[Q.Q4_K][1]
    raw = rng.integers(0, 256, (2, 2 * block), dtype=np.uint8)  # two rows of two Q4_K super-blocks (512 values)
    raw[:, 0:4] = np.frombuffer(np.array([0.01, 0.002], dtype=np.float16).tobytes(), np.uint8)  # sane d, dmin
    raw[:, block : block + 4] = raw[:, 0:4]
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_array("comfy.gguf.orig_shape.flat", [4, 256])  # ComfyUI-GGUF's record of a reshaped tensor
    writer.add_tensor("kquant", raw, raw_dtype=Q.Q4_K)
    writer.add_tensor("flat", np.arange(1024, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = open_tensors(path)
    assert source.shape("kquant") == (2, 512) and source.shape("flat") == (4, 256)
    reference = gguf.quants.dequantize(raw, Q.Q4_K)
    assert torch.equal(source.tensor("kquant"), torch.from_numpy(reference).reshape(2, 512))
    assert torch.equal(source.tensor("flat"), torch.arange(1024, dtype=torch.float32).reshape(4, 256))
    assert "Q4_K ×1" in describe(path) and "kept quantized when loaded" in describe(path)


def test_fp8_on_request_and_what_is_refused(tmp_path, monkeypatch):
    model = tiny_flux_model(seed=5)
    write_gguf(tmp_path / "kontext.gguf", model.state_dict())
    fp8 = kontext_core.load_transformer(
        tmp_path / "kontext.gguf", dtype=torch.float32, weight_dtype=torch.float8_e4m3fn
    )
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn

    write_gguf(tmp_path / "t5.gguf", {"enc.blk.0.attn_q.weight": torch.zeros(64, 64)}, architecture="t5encoder")
    with pytest.raises(CheckpointError, match="architecture 't5encoder'.*only FLUX transformers"):
        kontext_core.load_transformer(tmp_path / "t5.gguf")
    write_gguf(tmp_path / "sdxl.gguf", {"input_blocks.0.0.weight": torch.zeros(64, 64)}, architecture="sdxl")
    with pytest.raises(CheckpointError, match="a GGUF 'sdxl' model, not a FLUX transformer"):
        kontext_core.load_transformer(tmp_path / "sdxl.gguf")
    data = (tmp_path / "kontext.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: not a readable GGUF file, or truncated"):
        kontext_core.load_transformer(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        kontext_core.load_transformer(tmp_path / "text.gguf")

    from kontext_core.checkpoints import gguf_io

    monkeypatch.setattr(gguf_io, "_gguf", lambda: None)
    with pytest.raises(CheckpointError, match="GGUF files need the `gguf` package: pip install gguf"):
        kontext_core.load_transformer(tmp_path / "kontext.gguf")


@torch.no_grad()
def test_without_a_dtype_a_mixed_file_runs_in_one_precision_and_unnamed_architectures_load(tmp_path):
    model = tiny_flux_model(seed=6)
    # F32 1-D tensors, F16 2-D ones whose rows do not fit the blocks (txt_in), Q8_0 blocks (img_in among them), as
    # a converter mixes them; ComfyUI-GGUF marks files to be told apart by their tensor names "pig" or "cow"
    for architecture in ("flux", "pig", "cow", None):
        path = tmp_path / f"{architecture}.gguf"
        write_gguf(path, model.state_dict(), architecture=architecture, quantized_kinds=(Q.Q8_0,))
        loaded = kontext_core.load_transformer(path)
        floats = {p.dtype for p in loaded.parameters() if p.is_floating_point()}
        assert floats == {torch.float32} and loaded.compute_dtype == torch.float32, architecture  # img_in is Q8_0
        assert loaded(*flux_inputs(model.params)).isfinite().all()


def test_a_bad_recorded_shape_is_named(tmp_path):
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_array("comfy.gguf.orig_shape.flat", [3, 256])  # 768 values for a tensor of 1024
    writer.add_tensor("flat", np.zeros(1024, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="bad comfy.gguf.orig_shape.flat metadata"):
        open_tensors(path)


def test_closing_unmaps_the_file_and_reading_maps_it_again(tmp_path):
    model = tiny_flux_model(seed=7)
    write_gguf(tmp_path / "k.gguf", model.state_dict())
    source = open_tensors(tmp_path / "k.gguf")
    key = "double_blocks.0.img_attn.qkv.weight"
    before = source.tensor(key)
    source.close()  # load_transformer does this as it goes, so the mapped pages it has read are given back
    assert source._reader is None and key in source and source.shape(key) == tuple(before.shape)
    assert torch.equal(source.tensor(key), before)
