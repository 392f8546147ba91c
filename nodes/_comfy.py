"""The one module that touches ComfyUI: node specs turned into V3 / V1 classes, model folders, progress.

Nodes are written once as plain classes (`KontextNode`) so they run and test without ComfyUI;
`v3_class` / `v1_class` wrap them for whichever API the running ComfyUI has. Every ComfyUI import is
guarded: outside ComfyUI the bridges quietly do nothing (no progress bar, no previews, no interrupts).
"""

from __future__ import annotations

import gc
import importlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

MODEL_EXTENSIONS = (".safetensors", ".sft")
# ComfyUI-GGUF's quantized transformers sit beside the others; GGUF text encoders and VAEs are not read here
EXTRA_EXTENSIONS = {"diffusion_models": (".gguf",)}
_HIDDEN_V1 = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}


def comfy_module(name: str):
    """A ComfyUI module (`folder_paths`, `comfy.utils`, …) or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------- node specs


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


def model_input(node: type[KontextNode], name: str, model: Any) -> tuple[torch.nn.Module, tuple]:
    """The transformer of a KONTEXT_MODEL and the LoRAs it carries, or a ValueError naming the input."""
    if isinstance(model, LoraModel):
        return model.transformer, model.loras
    if isinstance(model, torch.nn.Module):
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


# ---------------------------------------------------------------- ComfyUI classes


def v3_class(node: type[KontextNode]) -> type:
    """A `comfy_api.latest.io.ComfyNode` subclass that runs `node`."""
    from comfy_api.latest import io

    def define_schema(cls):
        return io.Schema(
            node_id=node.NODE_ID,
            display_name=node.DISPLAY_NAME,
            category=node.CATEGORY,
            description=node.DESCRIPTION,
            inputs=[_v3_input(io, spec) for spec in node.INPUTS],
            outputs=[_v3_type(io, out.type).Output(display_name=out.name, tooltip=out.tooltip) for out in node.OUTPUTS],
            hidden=[getattr(io.Hidden, name) for name in node.HIDDEN],
            is_output_node=node.OUTPUT_NODE,
            not_idempotent=node.NOT_IDEMPOTENT,
        )

    def execute(cls, **inputs):
        hidden = {name: getattr(cls.hidden, name, None) for name in node.HIDDEN} if cls.hidden else {}
        result = node.call(**inputs, **hidden)
        return io.NodeOutput(*result.outputs, ui=result.ui)

    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": node.DESCRIPTION}
    if "validate_inputs" in node.__dict__:
        # passed on as is: ComfyUI reads its parameter names, and a **kwargs signature would turn off
        # its own min/max checks
        attrs["validate_inputs"] = node.__dict__["validate_inputs"]
    if "fingerprint_inputs" in node.__dict__:  # what besides the inputs decides the output (files on disk)
        attrs["fingerprint_inputs"] = node.__dict__["fingerprint_inputs"]
    return type(node.__name__, (io.ComfyNode,), attrs)


def _v3_type(io, type_name: str):
    builtin = {
        "INT": io.Int,
        "FLOAT": io.Float,
        "STRING": io.String,
        "BOOLEAN": io.Boolean,
        "COMBO": io.Combo,
        "IMAGE": io.Image,
        "MASK": io.Mask,
        "LATENT": io.Latent,
        "CONDITIONING": io.Conditioning,
    }
    return builtin.get(type_name) or io.Custom(type_name)


def _v3_input(io, spec: Input):
    common = {"tooltip": spec.tooltip, "optional": spec.optional}
    if spec.type == "COMBO":
        return io.Combo.Input(spec.name, options=spec.choices(), default=spec.default, **common)
    if spec.type in ("INT", "FLOAT"):
        extra = {"control_after_generate": True} if spec.control_after_generate else {}
        kind = io.Int if spec.type == "INT" else io.Float
        return kind.Input(
            spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **extra, **common
        )
    if spec.type == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    return _v3_type(io, spec.type).Input(spec.name, **common)


def v1_class(node: type[KontextNode]) -> type:
    """The same node for ComfyUI builds without `comfy_api.latest` (INPUT_TYPES / RETURN_TYPES)."""

    def input_types(cls):
        required, optional = {}, {}
        for spec in node.INPUTS:
            (optional if spec.optional else required)[spec.name] = v1_input(spec)
        types = {"required": required, "optional": optional}
        if node.HIDDEN:
            types["hidden"] = {name: _HIDDEN_V1[name] for name in node.HIDDEN}
        return types

    def execute(self, **inputs):
        result = node.call(**inputs)
        return {"result": result.outputs, "ui": result.ui} if result.ui is not None else result.outputs

    attrs = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(out.type for out in node.OUTPUTS),
        "RETURN_NAMES": tuple(out.name for out in node.OUTPUTS),
        "OUTPUT_TOOLTIPS": tuple(out.tooltip for out in node.OUTPUTS),
        "FUNCTION": "execute",
        "execute": execute,
        "CATEGORY": node.CATEGORY,
        "DESCRIPTION": node.DESCRIPTION,
        "OUTPUT_NODE": node.OUTPUT_NODE,
        "NOT_IDEMPOTENT": node.NOT_IDEMPOTENT,
    }
    if "validate_inputs" in node.__dict__:
        attrs["VALIDATE_INPUTS"] = node.__dict__["validate_inputs"]
    if "fingerprint_inputs" in node.__dict__:
        attrs["IS_CHANGED"] = node.__dict__["fingerprint_inputs"]
    return type(node.__name__, (), attrs)


def v1_input(spec: Input) -> tuple:
    options = {"tooltip": spec.tooltip}
    for key in ("default", "min", "max", "step"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    if spec.multiline:
        options["multiline"] = True
    if spec.control_after_generate:
        options["control_after_generate"] = True
    if spec.type == "COMBO":
        return (spec.choices(), options)
    return (spec.type, options)


# ---------------------------------------------------------------- model folders


def model_folders(kind: str) -> list[str]:
    """ComfyUI's folders for `kind` ("diffusion_models", "text_encoders", "vae"); none outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return []
    return [p for p in folder_paths.get_folder_paths(kind) if os.path.isdir(p)]


def builtin_models(kind: str) -> dict[str, str]:
    """The built-in small model's files offered beside the user's (combo name -> path), when shipped."""
    from kontext_core.small_model import BUILTIN_PREFIX, small_model_files

    files = small_model_files()
    paths = {"diffusion_models": [files.transformer], "text_encoders": [files.t5, files.clip], "vae": [files.vae]}
    return {f"{BUILTIN_PREFIX}{p.name}": str(p) for p in paths.get(kind, []) if p.is_file()}


def list_models(kind: str) -> list[str]:
    """Model files (safetensors only: pickles are never loaded) under the `kind` folders, as relative names,
    then the built-in small model's (so a graph runs before any real weights are installed)."""
    names = set()
    for root in model_folders(kind):
        for folder, _, files in os.walk(root, followlinks=True):
            for file in files:
                if file.lower().endswith(MODEL_EXTENSIONS + EXTRA_EXTENSIONS.get(kind, ())):
                    names.add(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
    return sorted(names) + list(builtin_models(kind))


def check_model_name(kind: str, name: str, input_name: str) -> bool | str:
    """True, or the message ComfyUI shows when a queued prompt names a file the folder does not hold."""
    try:
        model_path(kind, name, input_name)
    except ValueError as e:
        return str(e)
    return True


def model_path(kind: str, name: str, input_name: str) -> str:
    """The file behind a combo value. Only names the folder listing offers are accepted, so a workflow
    cannot reach outside the model folders (no absolute paths, no `..`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"input '{input_name}' must name a file in ComfyUI's models/{kind} folder, got {name!r}")
    builtin = builtin_models(kind)
    if name in builtin:
        return builtin[name]
    if name in list_models(kind):
        for root in model_folders(kind):
            path = os.path.join(root, *name.split("/"))
            if os.path.isfile(path):
                return path
    raise ValueError(
        f"input '{input_name}': {name!r} is not a .safetensors file in ComfyUI's models/{kind} folder "
        f"(searched: {', '.join(model_folders(kind)) or 'no folders'})"
    )


def comfyui_root() -> str | None:
    """ComfyUI's install folder (for its shipped tokenizers), or None outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    # not folder_paths.base_path: with --base-directory (ComfyUI Desktop) that is the user's data folder
    return os.path.dirname(os.path.abspath(folder_paths.__file__)) if folder_paths is not None else None


def input_directory() -> str:
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        raise RuntimeError("ComfyUI's input folder is only known inside ComfyUI")
    return folder_paths.get_input_directory()


def output_directory() -> str:
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        raise RuntimeError("ComfyUI's output folder is only known inside ComfyUI")
    return folder_paths.get_output_directory()


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata: saved images then carry no prompt or workflow, as core SaveImage's."""
    cli_args = comfy_module("comfy.cli_args")
    return cli_args is not None and bool(getattr(cli_args.args, "disable_metadata", False))


def user_directory() -> str | None:
    folder_paths = comfy_module("folder_paths")
    return folder_paths.get_user_directory() if folder_paths is not None else None


# ---------------------------------------------------------------- devices, memory, cache


def torch_device() -> torch.device:
    management = comfy_module("comfy.model_management")
    if management is not None:
        return management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    """Make room before a large load: ComfyUI's own models out, cached blocks back to the driver."""
    gc.collect()
    management = comfy_module("comfy.model_management")
    if management is not None:
        management.unload_all_models()
        management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelSlot:
    """Keeps one loaded object per loader: reused while its key (file, size, mtime, options) is unchanged,
    dropped before the next one loads so two large models never sit in memory together."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, path: str, options: tuple, load: Callable[[], Any]) -> Any:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, options)
        if key != self.key:
            self.key = self.value = None
            free_memory()
            self.value = load()
            self.key = key
        return self.value


# ---------------------------------------------------------------- progress, previews, interrupts


def step_callback(total: int) -> Callable[[Any], None]:
    """A `sampling.sample` callback: stops on ComfyUI's interrupt, moves the progress bar, sends previews."""
    utils = comfy_module("comfy.utils")
    management = comfy_module("comfy.model_management")
    bar = utils.ProgressBar(total) if utils is not None else None
    previewer = _previewer() if bar is not None else None

    def callback(info) -> None:
        if management is not None:
            management.throw_exception_if_processing_interrupted()
        if bar is not None:
            image = previewer.decode_latent_to_preview_image("JPEG", info.denoised) if previewer else None
            bar.update_absolute(info.step, info.total, image)

    return callback


@contextmanager
def interruptible(model: torch.nn.Module) -> Iterator[None]:
    """ComfyUI's interrupt also checked before every transformer block, not only after each step: one step of a
    large image on a CPU takes minutes, and Cancel should not wait for it."""
    from kontext_core.model.layers import DoubleStreamBlock, SingleStreamBlock

    management = comfy_module("comfy.model_management")
    if management is None:
        yield
        return

    def check(module, args) -> None:
        management.throw_exception_if_processing_interrupted()

    blocks = [m for m in model.modules() if isinstance(m, (DoubleStreamBlock, SingleStreamBlock))]
    handles = [block.register_forward_pre_hook(check) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _previewer():
    # ComfyUI's own previewer (latent→RGB factors or TAESD, per the user's setting) reads the model-space
    # latent, which is what the engine's `denoised` holds.
    latent_preview = comfy_module("latent_preview")
    latent_formats = comfy_module("comfy.latent_formats")
    if latent_preview is None or latent_formats is None:
        return None
    return latent_preview.get_previewer(torch_device(), latent_formats.Flux())
