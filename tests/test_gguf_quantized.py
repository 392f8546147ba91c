"""GGUF blocks kept quantized: the torch dequantizers against the `gguf` package's reference, bit for bit, and a
model that keeps its blocks against the same model expanded at load (forward, bf16, LoRA, offload, compile).

Files come from the `gguf` package's writer; the types it can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) from its
quantizer, the K-quants as random blocks with finite scales (`tests.helpers.gguf_files`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tests.helpers.flux_files import flux_inputs
from tests.helpers.gguf_files import finish, gguf_writer, random_blocks, write_gguf_blocks
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

import kontext_core
from kontext_core.checkpoints.gguf_io import GGUFSource
from kontext_core.runtime.gguf_dequant import BLOCK_FORMATS, dequantize
from kontext_core.runtime.gguf_linear import GGUFLinear, gguf_layers
from kontext_core.runtime.lora import apply_lora
from kontext_core.runtime.offload import offload

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what gguf.quants.quantize writes
KINDS = (*QUANTIZABLE, "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# rows of 256 values fit every block format, the K-quants' super-blocks included
WIDE = dataclasses.replace(
    TINY_FLUX, hidden_size=256, num_heads=4, axes_dim=[8, 28, 28], context_in_dim=256, vec_in_dim=256, depth=1
)


def _write_all_kinds(path, rows: int = 6):
    """One tensor of each listed kind, `rows` × 512 values, written by the gguf writer."""
    rng = np.random.default_rng(3)
    writer = gguf_writer(path, "flux")
    stored = {}
    for kind in KINDS:
        if kind in QUANTIZABLE:
            raw = gguf.quants.quantize(rng.standard_normal((rows, 512)).astype(np.float32), Q[kind])
        else:
            raw = random_blocks(kind, rows * 512, rng).reshape(rows, -1)
        writer.add_tensor(kind, raw, raw_dtype=Q[kind])
        stored[kind] = raw
    finish(writer)
    return stored


def test_every_block_format_dequantizes_bit_for_bit_as_the_reference(tmp_path):
    stored = _write_all_kinds(tmp_path / "kinds.gguf")
    source = GGUFSource(tmp_path / "kinds.gguf")
    for kind in KINDS:
        assert source.ggml_type(kind) == kind and source.shape(kind) == (6, 512)
        blocks = source.blocks(kind)
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (
            6 * 512 // BLOCK_FORMATS[kind].block_size,
            BLOCK_FORMATS[kind].type_size,
        )
        reference = gguf.quants.dequantize(stored[kind], Q[kind]).reshape(-1)
        ours = dequantize(blocks, kind).numpy()
        assert np.isfinite(reference).all() and np.abs(reference).max() > 0, kind
        assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32)), kind
    with pytest.raises(ValueError, match="Q4_K blocks must be uint8 \\[n, 144\\]"):
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_K")
    with pytest.raises(ValueError, match="GGML type 'IQ4_NL' has no torch dequantizer"):
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), "IQ4_NL")


def _wide_file(tmp_path, seed: int = 1):
    """A 1 + 2-block transformer 256 wide: each Linear weight in one of the ten block formats in turn, a few in
    F16 and BF16, the 1-D tensors F32."""
    model = tiny_flux_model(seed=seed, params=WIDE)
    state = model.state_dict()
    linears = [k for k, v in state.items() if v.ndim == 2]
    kinds = {k: KINDS[i % len(KINDS)] for i, k in enumerate(linears[:-2])}
    plain = {k: state[k].to(torch.float16 if i else torch.bfloat16) for i, k in enumerate(linears[-2:])}
    path = tmp_path / "kontext-wide.gguf"
    expected = write_gguf_blocks(path, {**state, **plain}, kinds)
    return path, model.params, kinds, expected


@torch.no_grad()
def test_a_model_keeps_its_blocks_and_computes_what_the_expanded_model_does(tmp_path):
    path, params, kinds, expected = _wide_file(tmp_path)
    kept = kontext_core.load_transformer(path)
    full = kontext_core.load_transformer(path, dequantize=True)
    assert gguf_layers(kept) == {k.removesuffix(".weight"): kind for k, kind in kinds.items()}
    assert not gguf_layers(full) and kept.compute_dtype == full.compute_dtype == torch.float32
    for key, value in full.state_dict().items():
        assert torch.equal(value, expected[key].to(value.dtype)), key
    # the two plain 2-D weights (F16, BF16 in the file) are ordinary tensors in the compute dtype
    plain = [k for k in expected if k.endswith(".weight") and expected[k].ndim == 2 and k not in kinds]
    assert len(plain) == 2 and all(kept.state_dict()[k].dtype == torch.float32 for k in plain)

    kept_bytes = sum(t.numel() * t.element_size() for t in kept.state_dict().values())
    full_bytes = sum(t.numel() * t.element_size() for t in full.state_dict().values())
    assert kept_bytes < 0.4 * full_bytes  # 2.6-8.5 bits a value at rest instead of 32
    inputs = flux_inputs(params)
    assert torch.equal(kept(*inputs), full(*inputs))  # the same float32 weights, the same matmuls

    # a compute dtype rounds the float32 dequantized weight once, as expanding the model at load does
    kept16 = kontext_core.load_transformer(path, dtype=torch.bfloat16)
    full16 = kontext_core.load_transformer(path, dtype=torch.bfloat16, dequantize=True)
    inputs16 = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
    assert kept16.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8
    assert torch.equal(kept16(*inputs16), full16(*inputs16))
    # an fp8 weight dtype expands the blocks and casts the block weights to fp8, as for a 16-bit file
    fp8 = kontext_core.load_transformer(path, dtype=torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    assert not gguf_layers(fp8) and fp8.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn


@torch.no_grad()
def test_lora_on_kept_blocks_is_added_at_each_call_and_comes_off_exactly(tmp_path):
    path, params, kinds, _ = _wide_file(tmp_path, seed=2)
    kept = kontext_core.load_transformer(path)
    full = kontext_core.load_transformer(path, dequantize=True)
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"):
        linear = full.get_submodule(layer)
        lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=gen) * 0.1
        lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=gen) * 0.1
    assert all(isinstance(kept.get_submodule(layer), GGUFLinear) for layer in ("double_blocks.0.img_attn.qkv",))
    inputs = flux_inputs(params)
    before = kept(*inputs)
    blocks = kept.double_blocks[0].img_attn.qkv.weight.clone()

    on_kept, on_full = apply_lora(kept, lora, 0.8), apply_lora(full, lora, 0.8)
    assert on_kept.applied == on_full.applied and len(on_kept.applied) == 2
    assert torch.equal(kept.double_blocks[0].img_attn.qkv.weight, blocks)  # still the file's blocks
    with_lora = kept(*inputs)
    assert not torch.equal(with_lora, before)
    torch.testing.assert_close(with_lora, full(*inputs), rtol=0, atol=0)  # the same float32 sum, rounded once
    on_kept.remove()
    assert torch.equal(kept(*inputs), before)


@torch.no_grad()
def test_kept_blocks_offload_exactly_and_compile(tmp_path):
    path, params, _, _ = _wide_file(tmp_path, seed=3)
    kept = kontext_core.load_transformer(path)
    inputs = flux_inputs(params)
    reference = kept(*inputs)
    handle = offload(kept, "cpu")  # the same hooks as for a GPU, with host and device one memory
    assert handle.resident_blocks() == 0
    assert torch.equal(kept(*inputs), reference)
    handle.remove()
    assert kept.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8

    layer = kept.double_blocks[0].img_mlp[0]
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(layer, dynamic=False)
    # inductor may fuse a scale's multiply and add into one rounding: equal up to fp32 rounding
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


def test_inspect_says_the_blocks_stay_quantized(tmp_path):
    from kontext_core.checkpoints.summary import describe

    path, *_ = _wide_file(tmp_path, seed=4)
    text = describe(path)
    assert "Q4_K ×" in text and "kept quantized when loaded" in text
