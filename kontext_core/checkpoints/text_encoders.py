"""Loading the T5-v1.1-XXL encoder and the CLIP-L text tower as `transformers` models.

Files: ComfyUI's `text_encoders/` singles (`clip_l.safetensors` with or without the `text_model.` prefix,
`t5xxl_fp16/bf16`, plain fp8 and ComfyUI's scaled fp8) and diffusers `text_encoder/` (CLIP) and
`text_encoder_2/` (T5) folders, sharded or not. The config comes from the folder's `config.json`, a `config`
JSON in the file's header, or the tensor shapes with the published CLIP-L / T5-v1.1 heads and activations.
The model is built on `meta` and each tensor is read from the memory-mapped file, dequantized if it is
fp8, cast and assigned on its own, so the weights never sit in memory twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from kontext_core.checkpoints.gguf_io import ACCEPT_T5, GGUFSource
from kontext_core.checkpoints.t5_gguf import BYTES_AS_INT8, is_llama_cpp_t5, kept_t5_blocks, t5_names
from kontext_core.runtime.gguf_linear import block_shape, use_gguf_linears
from kontext_core.runtime.quant import FP8_DTYPES
from kontext_core.checkpoints.safetensors_io import (
    SCALED_FP8_MARKERS,
    WEIGHT_SCALE_SUFFIXES,
    CheckpointError,
    TensorSource,
    assign_tensors,
    ensure_materialized,
    open_tensors,
    read_config_json,
)

# ComfyUI's full checkpoints keep the text encoders beside the other models under these prefixes.
T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.",)
# Input scales and per-layer format tags only matter to fp8 matmuls; the weights are dequantized here.
QUANT_EXTRA_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
# FLUX uses CLIP's pooled output before the projection, and only the text tower of a full CLIP model.
CLIP_UNUSED = ("text_projection.weight", "logit_scale", "embeddings.position_ids")
CLIP_UNUSED_PREFIXES = ("vision_model.", "visual_projection.")
# A full encoder-decoder T5 file: the encoder is all FLUX needs.
T5_UNUSED_PREFIXES = ("decoder.", "lm_head.")
DIFFUSION_PREFIXES = ("double_blocks.", "single_blocks.", "model.diffusion_model.", "transformer_blocks.")
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
CLIP_HEAD_DIM = 64  # every published CLIP text tower (B: 8 heads, L: 12, bigG: 20) has 64-wide heads


class _FileTensors:
    """One text-encoder file's tensors under the model's key names, dequantized and cast as they are read."""

    def __init__(self, path: Path, prefixes: tuple[str, ...], t5: bool = False):
        self.path = path
        gguf_t5 = t5 and path.suffix.lower() == ".gguf"
        if path.suffix.lower() == ".gguf" and not t5:
            raise CheckpointError(path, "of the text encoders only T5 is read from GGUF: give CLIP-L as .safetensors")
        self.source: TensorSource = (
            GGUFSource(path, accept=ACCEPT_T5) if gguf_t5 else open_tensors(path, weights_name="model")
        )
        keys = self.source.keys()
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), "")
        # llama.cpp's T5 names (`enc.blk.0.attn_q.weight`) stand for transformers' ones
        file_key = t5_names(keys) if gguf_t5 and is_llama_cpp_t5(keys) else {k: k for k in keys}
        self.all_keys = [k[len(prefix) :] for k in file_key if k.startswith(prefix)]
        self.names: dict[str, str] = {}  # our key -> file key
        self.scales: dict[str, str] = {}  # file weight key -> file key of its scale
        for local in self.all_keys:
            full = file_key[prefix + local]
            if local in SCALED_FP8_MARKERS or local.endswith(QUANT_EXTRA_SUFFIXES):
                continue
            if local.endswith(WEIGHT_SCALE_SUFFIXES):
                weight = prefix + local.rsplit(".", 1)[0] + ".weight"
                self.scales[file_key.get(weight, weight)] = full
            else:
                self.names[local] = full
        orphans = sorted(k for k in self.scales if k not in self.source)
        if orphans:
            raise CheckpointError(path, f"fp8 scales without their weights: {', '.join(orphans[:8])}")
        self._check_quant_formats()
        self.config = read_config_json(path) if path.is_dir() else self._metadata_config()

    def _metadata_config(self) -> dict | None:
        raw = self.source.metadata.get("config")
        if raw is None:
            return None
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise CheckpointError(self.path, "the `config` entry in the file's metadata is not valid JSON") from None
        if not isinstance(config, dict):
            raise CheckpointError(self.path, "the `config` entry in the file's metadata is not a JSON object")
        return config

    def _check_quant_formats(self) -> None:
        # the newer ComfyUI form names each quantized layer's format; only per-tensor/per-row fp8 is plain scaling
        raw = self.source.metadata.get("_quantization_metadata")
        if raw is None:
            return
        try:
            layers = json.loads(raw).get("layers", {})
            formats = {name: (spec.get("format") if isinstance(spec, dict) else spec) for name, spec in layers.items()}
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(self.path, "the `_quantization_metadata` header entry is not valid JSON") from None
        unsupported = {name: fmt for name, fmt in formats.items() if not str(fmt).startswith("float8")}
        if unsupported:
            name, fmt = next(iter(unsupported.items()))
            raise CheckpointError(
                self.path,
                f"{len(unsupported)} layers are quantized in a format this loader does not read (e.g. {name}: "
                f"{fmt!r}); use an fp16/bf16, fp8 or scaled-fp8 file",
            )

    def float_dtype(self) -> torch.dtype:
        """The compute dtype the file suggests: its weights' dtype, bf16 for fp8 files."""
        counts: dict[torch.dtype, int] = {}
        for full in self.names.values():
            dtype = self.source.dtype(full)
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + 1
        dtype = max(counts, key=counts.get)
        return torch.bfloat16 if dtype in FP8_DTYPES else dtype

    def read(self, full: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor stored under the file key `full`, dequantized if it is fp8 and cast to `dtype`."""
        t = self.source.tensor(full)
        scale_key = self.scales.get(full)
        if scale_key is not None:
            t = t.float() * self._broadcast_scale(self.source.tensor(scale_key).float(), t.shape, full)
        return t.to(dtype) if t.is_floating_point() else t

    def _broadcast_scale(self, scale: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
        if scale.numel() == 1:
            return scale.reshape(())
        if scale.numel() == shape[0]:
            return scale.reshape(shape[0], *([1] * (len(shape) - 1)))
        raise CheckpointError(
            self.path, f"the scale of {key} has {scale.numel()} values; expected 1 (per tensor) or {shape[0]} (per row)"
        )


def _kind_of(keys: list[str]) -> str:
    """What a set of tensor names looks like, for telling the user which file they passed."""
    key_set = set(keys)
    if any(".SelfAttention." in k for k in keys) or key_set & set(T5_EMBEDDINGS):
        return "a T5 encoder"
    if any(k.endswith("embeddings.token_embedding.weight") for k in keys):
        return "a CLIP text model"
    if any(k.startswith(DIFFUSION_PREFIXES) for k in keys):
        return "a diffusion transformer (load it with load_transformer)"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")) for k in keys):
        return "a VAE (load it with load_vae)"
    if any(k.startswith("vision_model.") for k in keys):
        return "a CLIP vision model"
    return "not a model this loader knows"


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    found = [int(m[1]) for k in shapes if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], origin: str | os.PathLike) -> T5Config:
    """A T5 encoder's config from its tensors; the relative-position distance and eps are T5-v1.1's."""
    try:
        vocab, d_model = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        d_ff = shapes[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"][0]
    except KeyError as e:
        raise CheckpointError(origin, f"incomplete T5 encoder: tensor {e} is missing") from None
    if inner % heads:
        raise CheckpointError(origin, f"T5 attention width {inner} is not a multiple of its {heads} heads")
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]], origin: str | os.PathLike) -> CLIPTextConfig:
    """A CLIP text tower's config from its tensors; heads, activation and eps are CLIP-L's."""
    try:
        vocab, hidden = shapes["embeddings.token_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(origin, f"incomplete CLIP text model: tensor {e} is missing") from None
    if hidden % CLIP_HEAD_DIM:
        raise CheckpointError(
            origin,
            f"cannot tell the number of attention heads of a CLIP text model {hidden} wide (not a multiple of "
            f"{CLIP_HEAD_DIM}); put its config.json beside it or a `config` JSON in the file's metadata",
        )
    # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|> (49406, 49407 in CLIP-L's)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=hidden,
        pad_token_id=1,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )


def t5_config_from_dict(config: dict, origin: str | os.PathLike) -> T5Config:
    if config.get("model_type", "t5") != "t5":
        raise CheckpointError(origin, f"its config is for a {config['model_type']!r} model, not a T5 encoder")
    return T5Config.from_dict({**config, "is_encoder_decoder": False, "use_cache": False})


def clip_config_from_dict(config: dict, origin: str | os.PathLike) -> CLIPTextConfig:
    if config.get("model_type") == "clip":  # a whole CLIPModel's config: the text tower's part
        config = config.get("text_config") or {}
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise CheckpointError(origin, f"its config is for a {config['model_type']!r} model, not a CLIP text model")
    return CLIPTextConfig.from_dict(config)


def _fill_meta_buffers(model: nn.Module) -> None:
    # Non-persistent buffers are not in the file, so `meta` construction leaves them empty. CLIP's
    # `position_ids` (0..n-1) is the only one these architectures have; any other means a new layout.
    for name, buffer in model.named_buffers():
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"{type(model).__name__} has a buffer {name} this loader does not know how to fill")
        owner, _, attr = name.rpartition(".")
        value = torch.arange(buffer.shape[-1]).expand(buffer.shape)
        model.get_submodule(owner).register_buffer(attr, value, persistent=False)


def _compute_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    # as `from_pretrained` does: in fp16, T5's `wo` projections stay fp32 (their activations overflow fp16)
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    dtypes = {}
    for key in model.state_dict():
        fp32 = dtype == torch.float16 and any(f".{m}." in f".{key}" for m in keep)
        dtypes[key] = torch.float32 if fp32 else dtype
    return dtypes


def _load(
    model: nn.Module,
    tensors: _FileTensors,
    names: dict[str, str],
    what: str,
    device: torch.device | str,
    dtype: torch.dtype | None,
    keep_blocks: bool = False,
) -> nn.Module:
    dtype = dtype or tensors.float_dtype()
    dtypes = _compute_dtypes(model, dtype)
    shapes = {ours: tensors.source.shape(full) for ours, full in names.items()}
    blocks: dict[str, str] = {}
    if keep_blocks:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        kinds = kept_t5_blocks(names, tensors.source.ggml_type, linears)
        # a layer held in float32 under fp16 (T5's `wo`, whose activations overflow fp16) is expanded at load
        blocks = {layer: kind for layer, kind in kinds.items() if dtypes[f"{layer}.weight"] == dtype}
        use_gguf_linears(model, blocks)
        shapes |= {f"{layer}.weight": block_shape(kind, shapes[f"{layer}.weight"]) for layer, kind in blocks.items()}
    read: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # tied tensors (T5's embeddings) are read once

    def get(key: str) -> torch.Tensor:
        layer = key.removesuffix(".weight")
        if layer in blocks:
            raw = tensors.source.blocks(names[key])
            return raw.view(torch.int8) if layer.endswith(BYTES_AS_INT8) else raw
        entry = (names[key], dtypes[key])
        if entry not in read:
            read[entry] = tensors.read(*entry)
        return read[entry]

    assign_tensors(model, shapes, get, tensors.path, device=device, what=what)
    _fill_meta_buffers(model)
    ensure_materialized(model, tensors.path)
    model.to(device)
    return model.eval().requires_grad_(False)


def load_t5(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> T5EncoderModel:
    """A `T5EncoderModel` from a ComfyUI t5xxl file (fp16/bf16/fp8/scaled fp8), a GGUF T5 encoder (llama.cpp's
    names, as city96's `t5-v1_1-xxl-encoder-Q*.gguf`) or a diffusers `text_encoder_2/`.

    `dtype=None` keeps the file's precision (bf16 for fp8 files, which are always dequantized; float32 for GGUF
    blocks). A GGUF file's quantized Linear weights stay in their blocks (`GGUFLinear`, dequantized per call to
    `dtype`) unless `dequantize=True`; its embedding and norms are read as float tensors.
    """
    path = Path(path)
    tensors = _FileTensors(path, T5_PREFIXES, t5=True)
    names = {k: v for k, v in tensors.names.items() if not k.startswith(T5_UNUSED_PREFIXES)}
    kind = _kind_of(tensors.all_keys)
    if kind != "a T5 encoder":
        raise CheckpointError(path, f"not a T5 text encoder: this is {kind}")
    # T5 ties its encoder's embedding to `shared`; files hold either name or both
    embedding = next((names[k] for k in T5_EMBEDDINGS if k in names), None)
    if embedding is not None:
        names.update(dict.fromkeys(T5_EMBEDDINGS, embedding))
    shapes = {k: tensors.source.shape(v) for k, v in names.items()}
    config = t5_config_from_dict(tensors.config, path) if tensors.config else t5_config_from_shapes(shapes, path)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    keep_blocks = isinstance(tensors.source, GGUFSource) and not dequantize
    return _load(model, tensors, names, "T5 encoder", device, dtype, keep_blocks)


def load_clip(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> CLIPTextModel:
    """A `CLIPTextModel` from ComfyUI's clip_l file (`text_model.` prefix or none) or a diffusers `text_encoder/`."""
    path = Path(path)
    tensors = _FileTensors(path, CLIP_PREFIXES)
    kind = _kind_of(tensors.all_keys)
    if kind != "a CLIP text model":
        raise CheckpointError(path, f"not a CLIP text model: this is {kind}")
    local = {k.removeprefix("text_model."): full for k, full in tensors.names.items()}
    local = {k: v for k, v in local.items() if k not in CLIP_UNUSED and not k.startswith(CLIP_UNUSED_PREFIXES)}
    shapes = {k: tensors.source.shape(v) for k, v in local.items()}
    config = clip_config_from_dict(tensors.config, path) if tensors.config else clip_config_from_shapes(shapes, path)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    # transformers 4.x nests the tower under `text_model.`, 5.x does not
    model_prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    names = {model_prefix + k: v for k, v in local.items()}
    return _load(model, tensors, names, "CLIP text model", device, dtype)
