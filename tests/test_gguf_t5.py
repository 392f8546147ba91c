"""T5 encoders in GGUF with llama.cpp's tensor names (city96's `t5-v1_1-xxl-encoder-Q*.gguf`): the names map to
transformers' T5, the Linear weights keep their blocks, and the encoder computes what the expanded one does."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.gguf_files import write_gguf_blocks, write_t5_gguf

from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.summary import describe
from kontext_core.checkpoints.t5_gguf import t5_names
from kontext_core.checkpoints.text_encoders import load_clip, load_t5
from kontext_core.runtime.gguf_linear import GGUFLinear, gguf_layers

pytest.importorskip("gguf")


@torch.no_grad()
def test_a_gguf_t5_keeps_its_blocks_and_encodes_as_the_reference(tmp_path):
    reference = write_t5_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf", vocab=96)
    kept = load_t5(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf")
    full = load_t5(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf", dequantize=True)
    layers = gguf_layers(kept)
    assert len(layers) == 2 * 7 and layers["encoder.block.1.layer.1.DenseReluDense.wo"] == "Q3_K"
    assert not gguf_layers(full) and kept.shared.weight.dtype == torch.float32  # the embedding is read as floats
    assert kept.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.int8  # bytes, typed so T5 keeps
    ids = torch.tensor([[5, 17, 42, 1, 0, 0], [9, 3, 88, 61, 2, 1]])
    expected = reference(input_ids=ids).last_hidden_state
    assert torch.equal(full(input_ids=ids).last_hidden_state, expected)
    assert torch.equal(kept(input_ids=ids).last_hidden_state, expected)  # the same float32 weights per call

    bf16 = load_t5(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf", dtype=torch.bfloat16)
    bf16_full = load_t5(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf", dtype=torch.bfloat16, dequantize=True)
    assert torch.equal(bf16(input_ids=ids).last_hidden_state, bf16_full(input_ids=ids).last_hidden_state)
    # in fp16, T5's `wo` runs in float32 (as transformers keeps it): those layers are expanded at load
    fp16 = load_t5(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf", dtype=torch.float16)
    wo = fp16.encoder.block[0].layer[1].DenseReluDense.wo
    assert not isinstance(wo, GGUFLinear) and wo.weight.dtype == torch.float32
    assert isinstance(fp16.encoder.block[0].layer[0].SelfAttention.q, GGUFLinear)
    text = describe(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf")  # `inspect` names it, from its header
    assert "kind:      T5 text encoder (llama.cpp names)" in text and "Q4_K ×4" in text


def test_llama_cpp_names_and_what_is_refused(tmp_path):
    ungated = t5_names(["enc.blk.3.ffn_up.weight", "dec.blk.0.attn_q.weight", "output.weight", "odd.weight"])
    assert ungated == {
        "encoder.block.3.layer.1.DenseReluDense.wi.weight": "enc.blk.3.ffn_up.weight",
        "decoder.block.0.layer.0.SelfAttention.q.weight": "dec.blk.0.attn_q.weight",
        "lm_head.weight": "output.weight",
        "odd.weight": "odd.weight",
    }
    write_gguf_blocks(tmp_path / "llm.gguf", {"blk.0.attn_q.weight": torch.zeros(4, 32)}, {}, architecture="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama', not a T5 encoder"):
        load_t5(tmp_path / "llm.gguf")
    with pytest.raises(CheckpointError, match="only T5 is read from GGUF: give CLIP-L as .safetensors"):
        load_clip(tmp_path / "llm.gguf")
