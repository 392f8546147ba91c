"""LoRA for the FLUX transformer: the layouts people share, applied with a strength, removable exactly.

Layouts (one file may mix them):
- kohya / ComfyUI, BFL names: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
- kohya, diffusers names: `lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight`
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `.lora_B.weight`
- fal / ai-toolkit, BFL names: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`
- SimpleTuner LyCORIS names: `lycoris_transformer_blocks_0_attn_to_q.lora_down.weight`
- full differences, as ComfyUI's LoRA trainer and extractor write them beside the low-rank pairs:
  `diffusion_model.double_blocks.0.img_attn.proj.diff` (weight), `.diff_b` (bias), and
  `diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff` for a parameter of another kind
  (LyCORIS' `.w_norm` / `.b_norm` are the same as `.diff` / `.diff_b`)

A diffusers target that is part of a fused BFL weight (to_q/to_k/to_v of `qkv`, to_q/to_k/to_v/proj_mlp of
single-block `linear1`; `linear1_qkv` for all three) updates its row slice; `norm_out.linear` updates the final
modulation with its halves swapped, as the weights themselves are. Each update is
W[rows] += strength · alpha/rank · up @ down, or W[rows] += strength · diff. DoRA (`dora_scale`), LoKr and LoHa
files are refused: their updates are not low-rank pairs, and applying part of one would be wrong.

Plain parameters are recomputed from the kept original, so removing every LoRA gives back the very tensor that
was there before. Quantized weights (fp8, GGUF blocks) stay quantized: their updates ride along and are added to the
dequantized weight at each call, so the memory saving survives and removal is exact.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kontext_core.checkpoints.flux_diffusers import (
    DOUBLE_BLOCK_RENAMES,
    FUSED_DOUBLE,
    FUSED_SINGLE,
    SINGLE_BLOCK_RENAMES,
    TOP_LEVEL_RENAMES,
)
from kontext_core.checkpoints.safetensors_io import CheckpointError, first_items, open_tensors
from kontext_core.runtime.quant import DequantizingLinear

__all__ = [
    "LoraFactor",
    "LoraPatch",
    "LoraResult",
    "apply_lora",
    "load_lora",
    "remove_lora",
    "unmatched_note",
    "use_loras",
    "weights_version",
]

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_PART = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<down>lora_down|lora_A|lora\.down)|(?P<up>lora_up|lora_B|lora\.up))(?:\.[^.]+)?\.weight$"
    r"|^(?P<amodule>.+?)\.alpha$"
    r"|^(?P<dmodule>.+?)\.(?P<diff>diff|w_norm|diff_b|b_norm)$"
)
_TEXT_ENCODER_KEY = r"lora_te\d?_|text_encoders?(_2)?\."
_DIFF_ROLES = {"diff": "diff", "w_norm": "diff", "diff_b": "diff_b", "b_norm": "diff_b"}
# kinds of update this module does not apply, by a key part that only they use
_UNSUPPORTED = {
    ".dora_scale": "DoRA (`dora_scale`)",
    ".lora_magnitude_vector": "DoRA (`lora_magnitude_vector`)",
    ".lokr_w1": "LyCORIS LoKr",
    ".hada_w1_a": "LyCORIS LoHa",
    ".oft_blocks": "OFT",
}


@dataclass(eq=False)
class LoraFactor:
    """One update: rows `rows` of `layer`'s parameter `param` += scale · up @ down, or scale · up when `down` is
    None (a full difference); halves swapped if asked."""

    layer: str
    up: Tensor
    down: Tensor | None
    scale: float
    rows: slice = field(default_factory=lambda: slice(None))
    swap_halves: bool = False
    param: str = "weight"

    def add_to(self, weight: Tensor) -> Tensor:
        """`weight` plus this update, in `weight`'s dtype (the update is taken in float32)."""
        delta = self.up.to(weight.device, torch.float32)
        if self.down is not None:
            delta = delta @ self.down.to(weight.device, torch.float32)
        delta = delta * self.scale
        if self.swap_halves:
            first, second = delta.chunk(2, dim=0)
            delta = torch.cat((second, first), dim=0)
        out = weight.clone()
        out[self.rows] = (weight[self.rows].float() + delta).to(weight.dtype)
        return out


@dataclass(eq=False)
class LoraResult:
    """What `apply_lora` did: the layers it updated, and every key of the LoRA that matched nothing."""

    applied: list[str]
    unmatched: list[str]
    factors: list[LoraFactor] = field(repr=False, default_factory=list)
    model: nn.Module | None = field(repr=False, default=None)

    def remove(self) -> None:
        remove_lora(self)


def _targets(model: nn.Module) -> dict[str, tuple[str, slice, bool]]:
    """Every name a LoRA may use for a Linear of `model` → (BFL layer, rows, swap halves)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = {n: (n, slice(None), False) for n in linears}
    for diffusers, bfl in TOP_LEVEL_RENAMES.items():
        if bfl in linears:
            targets[diffusers] = (bfl, slice(None), False)
    if "final_layer.adaLN_modulation.1" in linears:
        targets["norm_out.linear"] = ("final_layer.adaLN_modulation.1", slice(None), True)
    for name, linear in linears.items():
        if m := re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name):
            kind, index, inner = m.groups()
            block = f"transformer_blocks.{index}." if kind == "double" else f"single_transformer_blocks.{index}."
            renames, fused = (
                (DOUBLE_BLOCK_RENAMES, FUSED_DOUBLE) if kind == "double" else (SINGLE_BLOCK_RENAMES, FUSED_SINGLE)
            )
            for diffusers, bfl in renames.items():
                if bfl == inner:
                    targets[block + diffusers] = (name, slice(None), False)
            if inner in fused:
                hidden = linear.in_features
                sizes = [hidden] * 3 + ([linear.out_features - 3 * hidden] if len(fused[inner]) == 4 else [])
                start = 0
                for part, size in zip(fused[inner], sizes):
                    targets[block + part] = (name, slice(start, start + size), False)
                    start += size
            if kind == "single" and inner == "linear1":  # q, k and v in one (XLabs / USO)
                targets[f"single_blocks.{index}.linear1_qkv"] = (name, slice(0, 3 * linear.in_features), False)
    # kohya writes the same names with every dot as an underscore
    for name, target in list(targets.items()):
        for prefix in _UNDERSCORE_PREFIXES:
            targets[prefix + name.replace(".", "_")] = target
    return targets


def _resolve(module: str, targets: dict) -> tuple | None:
    if module in targets:
        return targets[module]
    for prefix in _PREFIXES:
        if module.startswith(prefix) and module[len(prefix) :] in targets:
            return targets[module[len(prefix) :]]
    return None


def _other_parameters(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Parameters a `.diff` may name directly (norm scales, biases): full name → (module, parameter)."""
    return {name: tuple(name.rsplit(".", 1)) for name, _ in model.named_parameters() if "." in name}


def _read(lora: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    if isinstance(lora, Mapping):
        return dict(lora), "LoRA state dict"
    source = open_tensors(lora)
    return dict(source.items()), str(lora)


@dataclass(eq=False)
class LoraPatch:
    """A LoRA matched against one model's layers and checked, not yet applied (`load_lora`). It holds the
    factors, so `use_loras` can put it on and take it off again without reading the file twice."""

    origin: str
    strength: float
    layers: list[str]
    unmatched: list[str]
    factors: list[LoraFactor] = field(repr=False, default_factory=list)
    model: weakref.ref | None = field(repr=False, default=None)


def load_lora(model: nn.Module, lora: str | os.PathLike | Mapping[str, Tensor], strength: float = 1.0) -> LoraPatch:
    """Read a LoRA (a safetensors file or a state dict) and match it to `model`'s Linear layers, changing nothing.

    Refused (CheckpointError) when no key names a layer of `model`, or when any matched tensor has the wrong
    shape (a LoRA for another model); keys that match no layer, or lack their up/down partner, are listed in
    `unmatched`, never dropped silently.
    """
    tensors, origin = _read(lora)
    unsupported = sorted({kind for key in tensors for part, kind in _UNSUPPORTED.items() if part in key})
    if unsupported:
        raise CheckpointError(
            origin,
            f"{' and '.join(unsupported)} LoRAs are not supported (only low-rank pairs "
            "and full differences): applying part of one would give a wrong result",
        )
    targets = _targets(model)
    groups: dict[str, dict[str, Tensor]] = {}
    keys_of: dict[str, dict[str, str]] = {}  # module -> role -> the key it came from
    unmatched: list[str] = []
    for key, value in tensors.items():
        m = _PART.match(key)
        if m is None:
            unmatched.append(key)
            continue
        if m["diff"]:
            role, module = _DIFF_ROLES[m["diff"]], m["dmodule"]
        else:
            role, module = ("alpha" if m["amodule"] else "down" if m["down"] else "up"), m["amodule"] or m["module"]
        groups.setdefault(module, {})[role] = value
        keys_of.setdefault(module, {})[role] = key
    if not groups:
        raise CheckpointError(origin, "no LoRA tensors (`lora_down`/`lora_up`, `lora_A`/`lora_B` or `.diff`) found")

    factors: list[LoraFactor] = []
    wrong: list[str] = []
    others = _other_parameters(model)
    for module, parts in groups.items():
        keys = keys_of[module]
        target = _resolve(module, targets)
        if target is None and set(parts) == {"diff"} and (parameter := _resolve(module, others)) is not None:
            layer, param = parameter  # a parameter named in full: a norm's scale, a bias
            expected = tuple(getattr(model.get_submodule(layer), param).shape)
            if tuple(parts["diff"].shape) != expected:
                wrong.append(f"{module}.diff ({tuple(parts['diff'].shape)} for {layer}.{param} {expected})")
            else:
                factors.append(LoraFactor(layer, parts["diff"], None, strength, param=param))
            continue
        pair = "up" in parts and "down" in parts
        if target is None or not (pair or "diff" in parts or "diff_b" in parts):
            unmatched.extend(keys.values())
            continue
        layer, rows, swap = target
        linear = model.get_submodule(layer)
        out_rows = len(range(linear.out_features)[rows])
        if pair:
            up, down = parts["up"], parts["down"]
            rank = down.shape[0]
            if down.ndim != 2 or up.ndim != 2 or up.shape != (out_rows, rank) or down.shape[1] != linear.in_features:
                wrong.append(
                    f"{module} (up {tuple(up.shape)}, down {tuple(down.shape)} for {layer} "
                    f"{out_rows}×{linear.in_features})"
                )
            else:
                alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
                if isinstance(linear, DequantizingLinear):  # added at every call: on its device, in float32, once
                    up, down = (t.to(linear.weight.device, torch.float32) for t in (up, down))
                factors.append(LoraFactor(layer, up, down, strength * alpha / rank, rows, swap))
        elif "up" in parts or "down" in parts:  # half a pair beside a difference
            unmatched.extend(keys[role] for role in ("up", "down") if role in keys)
        for role, param, shape in (("diff", "weight", (out_rows, linear.in_features)), ("diff_b", "bias", (out_rows,))):
            if role not in parts:
                continue
            diff = parts[role]
            if tuple(diff.shape) != shape or getattr(linear, param) is None:
                wrong.append(f"{module}.{role} ({tuple(diff.shape)} for {layer}.{param} {shape})")
                continue
            if isinstance(linear, DequantizingLinear) and param == "weight":  # a full-size copy, in its file's dtype
                diff = diff.to(linear.weight.device)
            factors.append(LoraFactor(layer, diff, None, strength, rows, swap, param))
    if wrong:
        raise CheckpointError(
            origin, f"LoRA shapes do not fit this model (a LoRA for another model?): {first_items(wrong)}"
        )
    if not factors:
        if unmatched and all(re.match(_TEXT_ENCODER_KEY, key) for key in unmatched):
            raise CheckpointError(
                origin,
                "it holds only text-encoder parts (`lora_te…`, `text_encoder…`), which "
                f"apply to CLIP or T5, not to the FLUX transformer: {first_items(unmatched)}",
            )
        raise CheckpointError(
            origin,
            f"no LoRA layer names a layer of this FLUX model (a LoRA for another model?): {first_items(unmatched)}",
        )
    layers = sorted({_label(f) for f in factors})
    return LoraPatch(origin, strength, layers, sorted(unmatched), factors, weakref.ref(model))


def apply_lora(model: nn.Module, lora: str | os.PathLike | Mapping[str, Tensor], strength: float = 1.0) -> LoraResult:
    """Add a LoRA (a safetensors file or a state dict) to `model`'s Linear weights, in place (`load_lora` says
    what is refused and what is listed as unmatched)."""
    return _attach(model, load_lora(model, lora, strength))


def use_loras(model: nn.Module, patches: Sequence[LoraPatch]) -> None:
    """Make `patches`, in this order, exactly the LoRAs this function has put on `model`.

    Those already on in the same leading order stay merged, so a run repeated with the same LoRAs costs
    nothing; the others come off (restoring the weights exactly) and the new ones go on. An empty list takes
    every one off. LoRAs added with `apply_lora` are not touched. For a graph whose branches share one loaded
    transformer with different LoRAs, as ComfyUI's model patcher does.
    """
    for patch in patches:
        if patch.model is None or patch.model() is not model:
            raise ValueError(f"LoRA {patch.origin} was matched to another model (load_lora it for this one)")
    if len(set(map(id, patches))) != len(patches):
        raise ValueError("the same LoRA patch is listed twice (load_lora it again to add it twice)")
    stack: list[tuple[LoraPatch, LoraResult]] = model.__dict__.setdefault("_lora_stack", [])
    keep = 0
    while keep < min(len(stack), len(patches)) and stack[keep][0] is patches[keep]:
        keep += 1
    while len(stack) > keep:  # remove_lora and _attach refuse an offloaded model before changing anything
        stack[-1][1].remove()
        stack.pop()  # only once it is off: a failed removal stays on the stack, to be retried
    for patch in patches[keep:]:
        stack.append((patch, _attach(model, patch)))


def unmatched_note(unmatched: list[str]) -> str:
    """What to tell a user about the tensors of a LoRA that were not applied."""
    return (
        f"{len(unmatched)} tensors name no layer of the transformer and are not applied (text-encoder parts "
        f"are left out): {first_items(unmatched)}"
    )


def _label(factor: LoraFactor) -> str:
    rows = "" if factor.rows == slice(None) else f"[{factor.rows.start}:{factor.rows.stop}]"
    return factor.layer + ("" if factor.param == "weight" else f".{factor.param}") + rows


def weights_version(model: nn.Module) -> int:
    """A number that changes whenever LoRAs go on or come off `model` (for what keeps copies of its weights,
    such as captured CUDA graphs)."""
    return model.__dict__.get("_weights_version", 0)


def _changing(model: nn.Module) -> None:
    if model.__dict__.get("_block_offload") is not None:
        raise ValueError(
            "LoRAs cannot go on or come off while the transformer is offloaded (kontext_core.runtime.offload keeps its own "
            "copies of the block weights): change them before offload(), or after its remove()"
        )
    model.__dict__["_weights_version"] = weights_version(model) + 1


def _attach(model: nn.Module, patch: LoraPatch) -> LoraResult:
    _changing(model)
    result = LoraResult(patch.layers, patch.unmatched, patch.factors, model)
    try:
        for target in dict.fromkeys((f.layer, f.param) for f in patch.factors):
            module = model.get_submodule(target[0])
            mine = [f for f in patch.factors if (f.layer, f.param) == target]
            _set_factors(module, target[1], _factors_of(module, target[1]) + mine)
    except BaseException:  # out of memory half-way: the layers done so far come off again
        result.remove()
        raise
    return result


def remove_lora(result: LoraResult) -> None:
    """Undo one `apply_lora`; other LoRAs stay. With none left, every weight is its original tensor again."""
    if result.model is None:
        return
    _changing(result.model)
    for layer, param in dict.fromkeys((f.layer, f.param) for f in result.factors):
        module = result.model.get_submodule(layer)
        _set_factors(module, param, [f for f in _factors_of(module, param) if all(f is not g for g in result.factors)])
    result.model = None


def _factors_of(module: nn.Module, param: str) -> list[LoraFactor]:
    return list(module.__dict__.get("_lora_factors", {}).get(param, []))


def _set_factors(module: nn.Module, param: str, factors: list[LoraFactor]) -> None:
    applied = module.__dict__.setdefault("_lora_factors", {})
    if isinstance(module, DequantizingLinear) and param == "weight":  # read by the layer at each call: nothing to merge
        applied[param] = factors
        return
    # The original parameter, kept outside the module's registry so the state dict stays the BFL keys. While
    # merged copies are in use it waits in host memory, as ComfyUI's LoRA backup does: on the device it would
    # double the memory of every patched layer (+23 GB for all block linears of the 12B model in bf16).
    originals = module.__dict__.setdefault("_lora_base", {})
    current = getattr(module, param)  # where the model is now, and in what dtype (it may have moved since)
    if param not in originals:
        if not factors:
            return
        originals[param] = current
    base = originals[param]
    if not factors:  # the very parameter again, back where the model is
        base.data = base.data.to(current.device, current.dtype)
        setattr(module, param, base)
        del originals[param]
        applied.pop(param, None)
        return
    with torch.no_grad():
        merged = base.detach().to(current.device, torch.float32)  # summed in float32, rounded once
        for f in factors:
            merged = f.add_to(merged)
        merged = merged.to(current.dtype)
    base.data = base.data.to("cpu", current.dtype)
    setattr(module, param, nn.Parameter(merged, requires_grad=base.requires_grad))
    applied[param] = factors  # recorded once installed, so a failure above leaves the record true
