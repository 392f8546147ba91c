"""Loading the FLUX.1 Kontext transformer from every file a ComfyUI user has.

BFL single files (bf16/fp16/fp32, with or without ComfyUI's `model.diffusion_model.` prefix), plain
fp8, ComfyUI's scaled fp8 (`scaled_fp8` marker + per-layer `scale_weight`, or `weight_scale` with a
`_quantization_metadata` header), and diffusers `transformer/` folders (sharded or not). The model is
built on `meta` and its tensors assigned one by one from the memory-mapped file.
`diffusers_to_bfl` is re-exported here for tools and tests that convert a whole state dict.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_core.model.config import FluxParams
from kontext_core.model.flux import Flux
from kontext_core.runtime.quant import FP8_DTYPES, enable_fp8_matmul, fp8_matmul_supported, use_fp8_linears
from kontext_core.checkpoints.flux_diffusers import Recipe, diffusers_recipes, diffusers_to_bfl, is_diffusers_flux
from kontext_core.checkpoints.flux_diffusers import recipe_shape, unused_keys
from kontext_core.checkpoints.safetensors_io import SCALED_FP8_MARKERS, WEIGHT_SCALE_SUFFIXES, CheckpointError
from kontext_core.checkpoints.safetensors_io import TensorSource, assign_tensors, ensure_materialized, first_items
from kontext_core.checkpoints.safetensors_io import open_tensors, read_config_json
from kontext_core.checkpoints.flux_config import flux_params_from_tensors, wrong_architecture

__all__ = ["diffusers_to_bfl", "flux_params_from_tensors", "load_transformer", "stored_fp8_dtype", "wrong_architecture"]

FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# activation scales only tune ComfyUI's own fp8 matmul; our `_scaled_mm` path scales activations per call
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def is_block_linear_weight(key: str, shape: Sequence[int]) -> bool:
    """A Linear weight inside the double/single blocks: the weights an fp8 transformer holds in fp8."""
    return key.startswith(BLOCK_PREFIXES) and key.endswith(".weight") and len(shape) == 2


QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Converting loads give the file's pages back this often, so the file and the model never both sit in RAM.
RELEASE_EVERY_BYTES = 256 * 1024 * 1024


@dataclass
class FluxLayout:
    """What a transformer file holds, in BFL names: shapes, how to read each tensor, fp8 scales."""

    source: TensorSource
    shapes: dict[str, tuple[int, ...]]
    recipes: dict[str, Recipe]
    scales: dict[str, str] = field(default_factory=dict)  # layer name -> key of its weight scale
    quant_formats: dict[str, torch.dtype] = field(default_factory=dict)  # layer -> fp8 type of a uint8 container
    metadata_params: dict | None = None
    config_axes: list[int] | None = None

    def dtype(self, key: str) -> torch.dtype:
        layer = key.rpartition(".")[0]
        if key.endswith(".weight") and layer in self.quant_formats:
            return self.quant_formats[layer]
        return self.source.dtype(self.recipes[key].parts[0])

    def read(self, key: str) -> torch.Tensor:
        t = self.recipes[key].build(self.source.tensor)
        layer = key.rpartition(".")[0]
        if key.endswith(".weight") and t.dtype == torch.uint8 and layer in self.quant_formats:
            t = t.view(self.quant_formats[layer])  # fp8 bytes stored in a uint8 container
        return t

    def scale(self, layer: str) -> torch.Tensor:
        key = self.scales.get(layer)
        return self.source.tensor(key).float().reshape(()).clone() if key else torch.ones(())


def _quant_formats(path: Path, source: TensorSource, local: dict[str, str], prefix: str) -> dict[str, str]:
    """Layer -> quantization format named by `_quantization_metadata` or per-layer `.comfy_quant` blobs."""
    formats: dict[str, str] = {}
    raw = source.metadata.get("_quantization_metadata")
    if raw is not None:
        try:
            layers = json.loads(raw)["layers"]
            formats.update({k.removeprefix(prefix): conf["format"] for k, conf in layers.items()})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(
                path, "the `_quantization_metadata` entry in the file's metadata is malformed"
            ) from None
    for key, full in local.items():
        if key.endswith(".comfy_quant"):
            try:
                formats[key.removesuffix(".comfy_quant")] = json.loads(bytes(source.tensor(full).tolist()))["format"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(path, f"the quantization config {full!r} is malformed") from None
    unsupported = sorted({f for f in formats.values() if f not in QUANT_FORMATS})
    if unsupported:
        layer = next(k for k, f in formats.items() if f == unsupported[0])
        raise CheckpointError(
            path,
            f"quantization format {', '.join(unsupported)} (e.g. layer {layer}) is not supported: Kontext Core runs "
            f"bf16/fp16/fp32 files and fp8 ({', '.join(QUANT_FORMATS)}) with per-tensor scales",
        )
    return formats


def read_layout(path: Path) -> FluxLayout:
    """Classify a file's tensors (weights, fp8 scales, markers) and map them to BFL names, reading no weight."""
    source = open_tensors(path)
    all_keys = source.keys()
    prefix = next((p for p in FLUX_PREFIXES if any(k.startswith(p) for k in all_keys)), "")
    # a full ComfyUI checkpoint also holds the VAE and text encoders: take the diffusion model only
    local = {k[len(prefix) :]: k for k in all_keys if k.startswith(prefix)}
    formats = _quant_formats(path, source, local, prefix)
    ignored = SCALED_FP8_MARKERS + INPUT_SCALE_SUFFIXES + (".comfy_quant",)
    weights = {
        k: full for k, full in local.items() if not k.endswith(WEIGHT_SCALE_SUFFIXES + ignored) and k not in ignored
    }
    scales = {k.rpartition(".")[0]: full for k, full in local.items() if k.endswith(WEIGHT_SCALE_SUFFIXES)}

    if is_diffusers_flux(list(weights)):
        diffusers = diffusers_recipes(list(weights))
        leftover = unused_keys(list(weights), diffusers)
        if leftover:
            raise CheckpointError(path, f"unexpected keys for a diffusers FLUX transformer: {first_items(leftover)}")
        recipes = {k: Recipe(tuple(weights[p] for p in r.parts), r.swap_halves) for k, r in diffusers.items()}
        shapes = {k: recipe_shape(r, source.shape) for k, r in recipes.items()}
        if scales or formats:
            raise CheckpointError(path, "quantized diffusers folders are not supported; use a BFL-layout fp8 file")
    else:
        recipes = {k: Recipe((full,)) for k, full in weights.items()}
        shapes = {k: source.shape(full) for k, full in weights.items()}

    reason = wrong_architecture(list(weights), shapes)
    if reason:
        raise CheckpointError(path, reason)
    _check_scales(path, source, scales, weights)

    metadata_params = None
    if "flux_params" in source.metadata:
        try:
            metadata_params = json.loads(source.metadata["flux_params"])
        except json.JSONDecodeError:
            raise CheckpointError(path, "the `flux_params` entry in the file's metadata is not valid JSON") from None
    config = read_config_json(path) if path.is_dir() else None
    config_axes = list(config["axes_dims_rope"]) if config and "axes_dims_rope" in config else None
    containers = {layer: QUANT_FORMATS[f] for layer, f in formats.items() if f"{layer}.weight" in weights}
    return FluxLayout(source, shapes, recipes, scales, containers, metadata_params, config_axes)


def _check_scales(path: Path, source: TensorSource, scales: dict[str, str], weights: dict[str, str]) -> None:
    orphans = sorted(full for layer, full in scales.items() if f"{layer}.weight" not in weights)
    if orphans:
        raise CheckpointError(path, f"weight scales without a weight (unexpected keys): {first_items(orphans)}")
    wide = sorted(full for full in scales.values() if math.prod(source.shape(full)) != 1)
    if wide:
        raise CheckpointError(
            path, f"per-channel or block-wise weight scales are not supported (per-tensor only): {first_items(wide)}"
        )
    unscaled = sorted(
        weights[f"{layer}.weight"]
        for layer in scales
        if source.dtype(weights[f"{layer}.weight"]) not in FP8_DTYPES + (torch.uint8,)
    )
    if unscaled:
        raise CheckpointError(path, f"weight scales next to weights that are not fp8: {first_items(unscaled)}")


def _check_device(
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    compute: torch.dtype,
    keeps_fp8: bool,
    fp8_matmul: bool,
) -> None:
    """Refuse, before reading any weight, a precision the device cannot hold or compute in."""
    if dtype is not None and (not dtype.is_floating_point or dtype in FP8_DTYPES):
        raise ValueError(f"dtype must be a float compute dtype (bf16, fp16, fp32), got {dtype}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(path, f"cannot load onto {device}: this PyTorch has no CUDA device")
    if device.type == "cuda" and compute == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CheckpointError(path, f"bf16 is not supported on {device}: pass dtype=torch.float16 or torch.float32")
    if keeps_fp8 and device.type == "mps":
        raise CheckpointError(
            path, "fp8 weights cannot be kept on MPS: pass dtype=torch.bfloat16 or torch.float16 to dequantize at load"
        )
    if fp8_matmul and compute not in (torch.bfloat16, torch.float16):
        raise CheckpointError(
            path,
            f"fp8 matmul computes in bf16 or fp16, not {compute}: every layer would quietly upcast instead",
        )
    if fp8_matmul and not fp8_matmul_supported(device):
        raise CheckpointError(
            path,
            f"fp8 matmul needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper), not {device}; "
            "leave fp8_matmul off to upcast fp8 weights per layer instead",
        )


def stored_fp8_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The fp8 type a transformer file stores Linear weights in (e4m3 first where it has both), None for a
    16/32-bit file; read from the header, no weight loaded."""
    layout = read_layout(Path(path))
    try:
        stored = {layout.dtype(k) for k, shape in layout.shapes.items() if k.endswith(".weight") and len(shape) == 2}
    finally:
        layout.source.close()
    return next((fp8 for fp8 in FP8_DTYPES if fp8 in stored), None)


def kept_gguf_blocks(layout: FluxLayout, linear_weights: set[str]) -> dict[str, str]:
    """Layer -> GGML type of each Linear weight a GGUF file stores in a block format that `GGUFLinear`
    dequantizes at each call; other types (IQ*, TQ*) are dequantized at load."""
    kind_of = getattr(layout.source, "ggml_type", None)
    if kind_of is None:
        return {}
    kinds = {k.removesuffix(".weight"): kind_of(layout.recipes[k].parts[0]) for k in linear_weights}
    from kontext_core.runtime.gguf_dequant import BLOCK_FORMATS  # GGUF's code loads for GGUF files only

    return {layer: kind for layer, kind in kinds.items() if kind in BLOCK_FORMATS}


def load_transformer(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    axes_dim: Sequence[int] | None = None,
    weight_dtype: torch.dtype | None = None,
    fp8_matmul: bool = False,
    keep_fp8: bool = False,
    dequantize: bool = False,
) -> Flux:
    """A FLUX.1 Kontext (or [dev]) transformer, its config inferred from the tensors.

    `dtype=None` keeps the file's precision: bf16/fp16/fp32 tensors stay as stored (a file mixing them, such as a
    GGUF file, takes its `img_in` weight's for all), and an fp8 file's
    Linear weights stay fp8 (with their scales) behind `Fp8Linear`, which upcasts each weight per call
    and computes in bf16. A float `dtype` sets the compute precision: every tensor is cast to it and fp8
    weights are dequantized, unless `weight_dtype` is an fp8 type, which keeps (or casts) the block
    Linear weights in that fp8 type, or `keep_fp8`, which keeps exactly the layers the file stores in fp8 (a
    mixed-precision file's 16-bit layers stay 16-bit) where the device can hold fp8 (MPS cannot: there they are
    dequantized), as ComfyUI's default weight dtype does. `fp8_matmul` multiplies fp8 e4m3 weights in fp8 with
    `torch._scaled_mm` on GPUs that can (compute capability 8.9+). `axes_dim` sets the RoPE axes when
    neither a `flux_params` header nor a diffusers `config.json` names them (other axes than those it names
    are an error).

    On the CPU, tensors kept as stored are the file's memory map (paged in on first use); a load that
    casts or moves tensors reads and converts them one at a time and gives the file's pages back as it
    goes, so RAM never holds the file and the model together.
    """
    path = Path(path)
    device = torch.device(device)
    if weight_dtype is not None and weight_dtype not in FP8_DTYPES and weight_dtype != dtype:
        raise ValueError(f"weight_dtype must be None or an fp8 dtype ({FP8_DTYPES}), got {weight_dtype}")
    layout = read_layout(path)

    file_axes = (layout.metadata_params or {}).get("axes_dim") or layout.config_axes
    if axes_dim is not None and file_axes is not None and list(axes_dim) != list(file_axes):
        raise ValueError(f"axes_dim={list(axes_dim)} contradicts the RoPE axes the file names, {list(file_axes)}")
    if layout.metadata_params is not None:
        try:
            params = FluxParams(**layout.metadata_params)
        except TypeError as e:
            raise CheckpointError(path, f"the `flux_params` metadata does not fit FluxParams ({e})") from None
    else:
        params = flux_params_from_tensors(layout.shapes, path, layout.config_axes or axes_dim)

    linear_weights = {k for k in layout.shapes if k.endswith(".weight") and len(layout.shapes[k]) == 2}
    file_fp8 = {k[: -len(".weight")] for k in linear_weights if layout.dtype(k) in FP8_DTYPES}
    if weight_dtype in FP8_DTYPES:
        block_linears = {k[: -len(".weight")] for k in linear_weights if is_block_linear_weight(k, layout.shapes[k])}
        fp8_layers = file_fp8 | block_linears
    else:
        fp8_layers = file_fp8 if dtype is None or (keep_fp8 and device.type != "mps") else set()
    gguf_layers = {} if dequantize or weight_dtype is not None else kept_gguf_blocks(layout, linear_weights)
    compute = dtype or (torch.bfloat16 if fp8_layers else None)
    stored = {d for k in layout.shapes if (d := layout.dtype(k)).is_floating_point and d not in FP8_DTYPES}
    if compute is None and (len(stored) > 1 or gguf_layers):
        # a file of mixed float precisions (GGUF: F32 norms beside BF16 embedders and dequantized blocks) runs in
        # one, its input embedder's (as do GGUF blocks, which have no precision of their own)
        compute = layout.dtype("img_in.weight")
    _check_device(path, device, dtype, compute or layout.dtype("img_in.weight"), bool(fp8_layers), fp8_matmul)

    try:
        with torch.device("meta"):
            model = Flux(params)
    except ValueError as e:
        raise CheckpointError(path, f"inconsistent transformer config: {e}") from None
    if fp8_layers:
        use_fp8_linears(model, fp8_layers)
    shapes = dict(layout.shapes)
    for layer in fp8_layers:
        shapes[f"{layer}.scale_weight"] = ()
    if gguf_layers:
        from kontext_core.runtime.gguf_linear import block_shape, use_gguf_linears

        use_gguf_linears(model, gguf_layers)
        for layer, kind in gguf_layers.items():
            shapes[f"{layer}.weight"] = block_shape(kind, layout.shapes[f"{layer}.weight"])

    def kept_blocks(key: str) -> bool:
        layer, _, param = key.rpartition(".")
        return param == "weight" and layer in gguf_layers

    def convert(key: str, t: torch.Tensor) -> torch.Tensor:
        layer, _, param = key.rpartition(".")
        if layer in fp8_layers and param == "weight":
            return t if t.dtype in FP8_DTYPES else t.to(weight_dtype)
        if t.dtype in FP8_DTYPES:  # dequantize for a full-precision copy
            return t.to(compute or torch.float32) * layout.scale(layer).to(compute or torch.float32)
        return t.to(compute) if compute is not None and t.is_floating_point() else t

    def kept_as_stored(key: str) -> bool:
        layer, _, param = key.rpartition(".")
        if kept_blocks(key):
            return True
        stored = layout.dtype(key)
        if layer in fp8_layers and param == "weight":
            return stored in FP8_DTYPES
        return stored not in FP8_DTYPES and (compute is None or not stored.is_floating_point or stored == compute)

    # A load that changes any tensor must not keep the file mapped: converted pages would stay resident.
    streaming = device.type != "cpu" or not all(kept_as_stored(k) for k in layout.shapes)
    read_since_release = 0

    def get(key: str) -> torch.Tensor:
        nonlocal read_since_release
        layer, _, param = key.rpartition(".")
        if param == "scale_weight" and layer in fp8_layers:
            return layout.scale(layer)
        if kept_blocks(key):
            # on the CPU the blocks stay the file's (copy-on-write) pages, as tensors kept as stored do
            return layout.source.blocks(layout.recipes[key].parts[0])
        source = layout.read(key)
        t = convert(key, source)
        if not streaming:
            return t
        if t.data_ptr() == source.data_ptr() and device.type == "cpu":
            t = t.clone()
        read_since_release += source.numel() * source.element_size()
        if read_since_release >= RELEASE_EVERY_BYTES:
            layout.source.close()  # unmaps what was read so far: those pages are converted copies now
            read_since_release = 0
        return t

    try:
        assign_tensors(model, shapes, get, path, device=device, what="FLUX transformer")
    finally:
        if streaming:
            layout.source.close()
    ensure_materialized(model, path)
    model.compute_dtype = compute
    if fp8_matmul:
        enable_fp8_matmul(model)
    return model.eval().requires_grad_(False)
