"""T5 encoders in GGUF with llama.cpp's tensor names (city96's `t5-v1_1-xxl-encoder-Q*.gguf`): the names map to
transformers' T5, the Linear weights keep their blocks, and the encoder computes what the expanded one does."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.gguf_files import write_gguf_blocks
from tests.helpers.tiny_models import randomize_
from transformers import T5Config, T5EncoderModel

from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.t5_gguf import t5_names
from kontext_core.checkpoints.text_encoders import load_clip, load_t5
from kontext_core.runtime.gguf_linear import GGUFLinear, gguf_layers

pytest.importorskip("gguf")

# llama.cpp part -> (transformers part, the GGML type written); rows of 256 fit the K-quants
PARTS = {
    "attn_q": ("layer.0.SelfAttention.q", "Q8_0"),
    "attn_k": ("layer.0.SelfAttention.k", "Q4_K"),
    "attn_v": ("layer.0.SelfAttention.v", "Q6_K"),
    "attn_o": ("layer.0.SelfAttention.o", "Q5_0"),
    "ffn_gate": ("layer.1.DenseReluDense.wi_0", "Q4_K"),
    "ffn_up": ("layer.1.DenseReluDense.wi_1", "Q5_K"),
    "ffn_down": ("layer.1.DenseReluDense.wo", "Q3_K"),
    "attn_norm": ("layer.0.layer_norm", None),
    "ffn_norm": ("layer.1.layer_norm", None),
    "attn_rel_b": ("layer.0.SelfAttention.relative_attention_bias", None),
}


def _t5_file(path):
    """A 2-layer gated T5 encoder 256 wide in llama.cpp's names, its Linear weights and embedding quantized."""
    config = T5Config(
        vocab_size=96, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    reference = randomize_(T5EncoderModel(config), seed=0, std=0.3).eval()
    ours = reference.state_dict()
    tensors = {
        "token_embd.weight": ours["shared.weight"],
        "enc.output_norm.weight": ours["encoder.final_layer_norm.weight"],
    }
    kinds = {"token_embd.weight": "Q8_0"}
    for i in range(config.num_layers):
        for part, (name, kind) in PARTS.items():
            key = f"encoder.block.{i}.{name}.weight"
            if key in ours:  # the relative-position bias is in block 0 only
                tensors[f"enc.blk.{i}.{part}.weight"] = ours[key]
                if kind:
                    kinds[f"enc.blk.{i}.{part}.weight"] = kind
    stored = write_gguf_blocks(path, tensors, kinds, architecture="t5encoder")
    names = t5_names(list(stored))
    reference.load_state_dict({k: stored[names[k]] for k in ours if k in names} | {
        "encoder.embed_tokens.weight": stored["token_embd.weight"]})  # fmt: skip
    return reference


@torch.no_grad()
def test_a_gguf_t5_keeps_its_blocks_and_encodes_as_the_reference(tmp_path):
    reference = _t5_file(tmp_path / "t5-v1_1-xxl-encoder-Q4_K_M.gguf")
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
