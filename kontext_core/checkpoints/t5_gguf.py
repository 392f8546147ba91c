"""T5 encoders in GGUF (city96's `t5-v1_1-xxl-encoder-Q8_0.gguf` and the like): llama.cpp's tensor names mapped to
those of transformers' `T5EncoderModel`, and which of its Linear weights keep their GGUF blocks.

llama.cpp's converter (gguf-py `tensor_mapping.py`) names the encoder `enc.blk.N.<part>`, the embedding
`token_embd`, the final norm `enc.output_norm`; a gated (v1.1) feed-forward's `wi_0` is `ffn_gate` and its
`wi_1` is `ffn_up`, an ungated one's `wi` is `ffn_up`. Decoder (`dec.`) and LM-head (`output`) tensors of a
whole T5 map to `decoder.` / `lm_head.`, which the encoder loader leaves out.
"""

from __future__ import annotations

import re

from kontext_core.runtime.gguf_dequant import BLOCK_FORMATS

_BLOCK_PARTS = {
    "attn_norm": "layer.0.layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_down": "layer.1.DenseReluDense.wo",
}
_TOP_LEVEL = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_KEY = re.compile(r"(?P<side>enc|dec)\.blk\.(?P<index>\d+)\.(?P<part>\w+)\.(?P<param>weight|bias)")
# transformers casts the input of `wo` to `wo.weight.dtype` unless that is int8 (its exemption for 8-bit
# quantized weights): kept GGUF blocks of `wo` are given as int8 bytes, so the activations keep their dtype
BYTES_AS_INT8 = (".DenseReluDense.wo",)


def is_llama_cpp_t5(keys: list[str]) -> bool:
    return any(k.startswith("enc.blk.") for k in keys)


def t5_names(keys: list[str]) -> dict[str, str]:
    """transformers name -> file key for each tensor of a llama.cpp T5 file; a key of another form keeps its name
    (so the loader reports it as unexpected)."""
    gated = any(".ffn_gate." in k for k in keys)
    parts = {**_BLOCK_PARTS, "ffn_up": "layer.1.DenseReluDense." + ("wi_1" if gated else "wi")}
    names = {}
    for key in keys:
        m = _BLOCK_KEY.fullmatch(key)
        if key in _TOP_LEVEL:
            names[_TOP_LEVEL[key]] = key
        elif m and m["part"] in parts:
            side = "encoder" if m["side"] == "enc" else "decoder"
            names[f"{side}.block.{m['index']}.{parts[m['part']]}.{m['param']}"] = key
        else:
            names[key] = key
    return names


def kept_t5_blocks(names: dict[str, str], ggml_type, linear_layers: set[str]) -> dict[str, str]:
    """Layer -> GGML type of each Linear weight (`linear_layers`) stored in a block format `GGUFLinear` runs;
    `ggml_type(file_key)` names a tensor's type. Embeddings and norms are read as float tensors."""
    kinds = {layer: ggml_type(names[f"{layer}.weight"]) for layer in linear_layers if f"{layer}.weight" in names}
    return {layer: kind for layer, kind in kinds.items() if kind in BLOCK_FORMATS}
