"""GGUF test files in the block formats the `gguf` package cannot quantize (the K-quants): random bytes with
finite float16 scales, so every value the reference dequantizes is a number, sized like a model weight."""

from __future__ import annotations

import numpy as np
import torch

# where each format keeps its float16 scales (and mins), and the largest |code| a scale multiplies
F16_FIELDS = {
    "Q4_0": ((0,), 8),
    "Q4_1": ((0, 2), 15),
    "Q5_0": ((0,), 16),
    "Q5_1": ((0, 2), 31),
    "Q8_0": ((0,), 127),
    "Q2_K": ((80, 82), 15 * 3),
    "Q3_K": ((108,), 32 * 4),
    "Q4_K": ((0, 2), 63 * 15),
    "Q5_K": ((0, 2), 63 * 31),
    "Q6_K": ((208,), 128 * 32),
}


def gguf_writer(path, architecture: str | None):
    """The `gguf` package's writer for `path`; `architecture=None` writes none, as stable-diffusion.cpp does."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture or "")
    if architecture is None:
        writer.kv_data[0].pop("general.architecture", None)
    return writer


def finish(writer) -> None:
    """Header, metadata and tensors to the file, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(kind: str, n_values: int, rng: np.random.Generator, magnitude: float = 0.3) -> np.ndarray:
    """Valid `kind` blocks for `n_values` values, `[n_blocks, type_size]` uint8, whose values stay within about
    ±`magnitude`."""
    import gguf

    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (n_values // block_size, type_size), dtype=np.uint8)
    offsets, largest = F16_FIELDS[kind]
    for offset in offsets:
        scales = (rng.uniform(0.25, 1.0, len(raw)) * magnitude / largest).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


def write_gguf_blocks(
    path,
    tensors: dict[str, torch.Tensor],
    kinds: dict[str, str],
    *,
    architecture: str | None = "flux",
    seed: int = 0,
    reference: bool = True,
) -> dict[str, torch.Tensor]:
    """A GGUF file whose tensors named in `kinds` are random valid blocks of that GGML type (their entries in
    `tensors` only give the shape: `meta` tensors will do), the others stored as given (F32, F16 or BF16). Returns
    {key: what the reference dequantizes the stored tensor to}, float32, in the tensor's shape (for the blocks
    only with `reference`)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf_writer(path, architecture)
    expected = {}
    for key, value in tensors.items():
        if key in kinds:
            kind = gguf.GGMLQuantizationType[kinds[key]]
            raw = random_blocks(kinds[key], value.numel(), rng).reshape(value.shape[0], -1)
            writer.add_tensor(key, raw, raw_dtype=kind)
            if reference:
                expected[key] = torch.from_numpy(gguf.quants.dequantize(raw, kind)).reshape(value.shape)
        elif value.dtype == torch.bfloat16:  # numpy has no bfloat16: the package's bytes of it
            raw = gguf.quants.quantize(value.float().numpy(), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
            expected[key] = value.float()
        else:
            array = value.detach().numpy()
            writer.add_tensor(key, array)
            expected[key] = torch.from_numpy(array.astype(np.float32))
    finish(writer)
    return expected


# llama.cpp part -> (transformers part, the GGML type written); rows of 256 fit the K-quants
T5_PARTS = {
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


def write_t5_gguf(path, vocab: int, d_model: int = 256, seed: int = 0):
    """A 2-layer gated T5 encoder `d_model` wide (a multiple of 256) as a GGUF file in llama.cpp's names
    (`enc.blk.N.attn_q.weight`, `token_embd.weight`, …), its Linear weights in the `T5_PARTS` types and its
    embedding in Q8_0, as city96's `t5-v1_1-xxl-encoder-Q*.gguf` files; returns a `T5EncoderModel` holding what
    the reference dequantizes them to."""
    from tests.helpers.tiny_models import randomize_
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 64,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    reference = randomize_(T5EncoderModel(config), seed=seed, std=0.3).eval()
    ours = reference.state_dict()
    names = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
    kinds = {"token_embd.weight": "Q8_0"}
    for i in range(config.num_layers):
        for part, (name, kind) in T5_PARTS.items():
            if f"encoder.block.{i}.{name}.weight" in ours:  # the relative-position bias is in block 0 only
                names[f"enc.blk.{i}.{part}.weight"] = f"encoder.block.{i}.{name}.weight"
                if kind:
                    kinds[f"enc.blk.{i}.{part}.weight"] = kind
    stored = write_gguf_blocks(
        path, {key: ours[ours_key] for key, ours_key in names.items()}, kinds, architecture="t5encoder", seed=seed
    )
    weights = {ours_key: stored[key] for key, ours_key in names.items()}
    reference.load_state_dict(weights | {"encoder.embed_tokens.weight": weights["shared.weight"]})
    return reference
