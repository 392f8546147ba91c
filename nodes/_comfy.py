"""What the nodes take from the running ComfyUI: its directories, the device and memory, progress bars,
previews and interrupts (its model folders are in _models.py).

Every ComfyUI import goes through `comfy_module` and is guarded: outside ComfyUI the bridges quietly do
nothing (no progress bar, no previews, no interrupts), so the nodes run and test without it.
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def comfy_module(name: str):
    """A ComfyUI module (`folder_paths`, `comfy.utils`, …) or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def comfyui_root() -> str | None:
    """ComfyUI's install folder (for its shipped tokenizers), or None outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    # not folder_paths.base_path: with --base-directory (ComfyUI Desktop) that is the user's data folder
    return os.path.dirname(os.path.abspath(folder_paths.__file__)) if folder_paths is not None else None


def comfy_directory(kind: str) -> str:
    """ComfyUI's "input", "output" or "temp" folder, as the running server has it (--input-directory, ...)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        raise RuntimeError(f"ComfyUI's {kind} folder is only known inside ComfyUI")
    return folder_paths.get_directory_by_type(kind)


def input_directory() -> str:
    return comfy_directory("input")


def output_directory() -> str:
    return comfy_directory("output")


def temp_directory() -> str:
    return comfy_directory("temp")


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
