"""Nodes as plain classes: their inputs and outputs, the checks every run makes, and the input coercers.

A `KontextNode` runs and tests without ComfyUI; `nodes._adapter` turns it into the class ComfyUI registers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from kontext_core.parallel.workers import WorkerGroup


@dataclass(frozen=True)
class Input:
    """One input socket or widget. `type` is ComfyUI's type name ("INT", "COMBO", "IMAGE", "KONTEXT_VAE", …)."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    options: Sequence[str] | Callable[[], list[str]] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    optional: bool = False
    control_after_generate: bool = False

    def choices(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options or ())


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str


@dataclass
class NodeResult:
    outputs: tuple
    ui: dict | None = None


class KontextNode:
    """A node written once: its spec as class attributes and `run(**inputs)`."""

    NODE_ID: ClassVar[str]
    DISPLAY_NAME: ClassVar[str]
    CATEGORY: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    INPUTS: ClassVar[tuple[Input, ...]] = ()
    OUTPUTS: ClassVar[tuple[Output, ...]] = ()
    HIDDEN: ClassVar[tuple[str, ...]] = ()  # names from _HIDDEN_V1, passed to run as keywords
    OUTPUT_NODE: ClassVar[bool] = False
    NOT_IDEMPOTENT: ClassVar[bool] = False

    @classmethod
    def run(cls, **inputs) -> tuple | NodeResult:
        raise NotImplementedError

    @classmethod
    def call(cls, **inputs) -> NodeResult:
        """Check every input against the spec, then run. Errors name the node and the input."""
        check_inputs(cls, inputs)
        result = cls.run(**inputs)
        return result if isinstance(result, NodeResult) else NodeResult(tuple(result))


def check_inputs(node: type[KontextNode], inputs: dict[str, Any]) -> None:
    """Raises a ValueError naming the first input that does not fit its spec; INT inputs given as whole floats
    (2.0 from a JSON client) become ints in `inputs`."""
    known = {spec.name for spec in node.INPUTS} | set(node.HIDDEN)
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ValueError(f"{node.NODE_ID}: unknown input(s) {unknown}; expected some of {sorted(known)}")
    for spec in node.INPUTS:
        value = inputs.get(spec.name)
        if value is None:
            if not spec.optional:
                raise ValueError(f"{node.NODE_ID}: input '{spec.name}' is required ({spec.type})")
            continue
        if spec.type in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{node.NODE_ID}: input '{spec.name}' must be a finite number, got {value!r}")
            if spec.type == "INT":
                if value != int(value):
                    raise ValueError(f"{node.NODE_ID}: input '{spec.name}' must be a whole number, got {value!r}")
                inputs[spec.name] = value = int(value)
            if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
                raise ValueError(
                    f"{node.NODE_ID}: input '{spec.name}' must be in [{spec.min}, {spec.max}], got {value!r}"
                )
        elif spec.type == "STRING" and not isinstance(value, str):
            raise ValueError(f"{node.NODE_ID}: input '{spec.name}' must be a string, got {type(value).__name__}")
        elif spec.type == "BOOLEAN" and not isinstance(value, bool):
            raise ValueError(f"{node.NODE_ID}: input '{spec.name}' must be true or false, got {value!r}")
        elif spec.type == "COMBO" and not callable(spec.options) and value not in spec.choices():
            raise ValueError(f"{node.NODE_ID}: input '{spec.name}' must be one of {spec.choices()}, got {value!r}")


def image_input(node: type[KontextNode], name: str, image: Any) -> torch.Tensor:
    """A ComfyUI IMAGE ([B, H, W, C] floats in 0..1), or a ValueError naming the input."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node.NODE_ID}: input '{name}' must be an IMAGE [B, H, W, C], got {shape}")
    if image.shape[0] == 0:
        raise ValueError(f"{node.NODE_ID}: input '{name}' is an empty batch")
    if image.shape[-1] == 1:  # grayscale: as RGB, which every consumer (VAE, save, safety) expects
        image = image.expand(*image.shape[:-1], 3)
    return image


def latent_input(node: type[KontextNode], name: str, latent: Any) -> torch.Tensor:
    """The raw [B, 16, h, w] tensor of a ComfyUI LATENT, or a ValueError naming the input."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 16:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
        raise ValueError(
            f"{node.NODE_ID}: input '{name}' must be a FLUX LATENT {{'samples': [B, 16, h, w]}}, got {shape}"
        )
    return samples


@dataclass(frozen=True)
class LoraModel:
    """A KONTEXT_MODEL with LoRAs: the loader's transformer, left as loaded, and the LoRAs to put on it for a run.
    The sampler applies them (`kontext_core.runtime.lora.use_loras`), so branches of one graph that share a loaded
    transformer, with and without LoRAs, each sample with their own."""

    transformer: torch.nn.Module
    loras: tuple  # kontext_core.runtime.lora.LoraPatch, in the order the LoRA loaders were chained


def is_worker_group(model: Any) -> bool:
    """A Kontext Parallel Model Loader's worker group. Its module loads only when such a loader runs (so the
    pack imports without it); until then no model can be one."""
    workers = sys.modules.get("kontext_core.parallel.workers")
    return workers is not None and isinstance(model, workers.WorkerGroup)


def model_input(node: type[KontextNode], name: str, model: Any) -> tuple[torch.nn.Module | WorkerGroup, tuple]:
    """The transformer of a KONTEXT_MODEL (or the worker group holding it) and the LoRAs it carries, or a
    ValueError naming the input."""
    if isinstance(model, LoraModel):
        return model.transformer, model.loras
    if isinstance(model, torch.nn.Module) or is_worker_group(model):
        return model, ()
    raise ValueError(f"{node.NODE_ID}: input '{name}' must be a KONTEXT_MODEL, got {type(model).__name__}")


def conditioning_input(node: type[KontextNode], name: str, conditioning: Any) -> list:
    ok = (
        isinstance(conditioning, list)
        and conditioning
        and all(
            isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], torch.Tensor) and isinstance(c[1], dict)
            for c in conditioning
        )
    )
    if not ok:
        raise ValueError(f"{node.NODE_ID}: input '{name}' must be a CONDITIONING [[tensor, dict], …]")
    return conditioning
