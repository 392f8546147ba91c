"""The model files the loaders offer: ComfyUI's model folders through its `folder_paths`, then the built-in
small model's files, so a graph runs before any real weights are installed.

Outside ComfyUI there are no model folders: only the built-in files are offered.
"""

from __future__ import annotations

from . import _comfy

# Safetensors only: pickled checkpoints (.ckpt, .pt, .bin) are never loaded.
MODEL_EXTENSIONS = (".safetensors", ".sft")
# ComfyUI-GGUF's quantized transformers and T5 encoders sit beside the others (GGUF VAEs are not read here)
EXTRA_EXTENSIONS = {"diffusion_models": (".gguf",), "text_encoders": (".gguf",)}
# our own folder_paths entries, one per kind, e.g. "kontext_core_diffusion_models"
FOLDER_KEY_PREFIX = "kontext_core_"


def _folder_key(folder_paths, kind: str) -> str:
    """Our folder_paths entry for `kind`: ComfyUI's very folder list (so extra_model_paths.yaml and
    --base-directory apply) with only the extensions we read. Registered once, as ComfyUI-GGUF registers its
    .gguf entries; ComfyUI then lists it with its own cache instead of a walk on every validation."""
    key = FOLDER_KEY_PREFIX + kind
    if key not in folder_paths.folder_names_and_paths:
        folders = folder_paths.folder_names_and_paths[kind][0]  # the list itself, not a copy
        extensions = set(MODEL_EXTENSIONS + EXTRA_EXTENSIONS.get(kind, ()))
        folder_paths.folder_names_and_paths[key] = (folders, extensions)
    return key


def model_folders(kind: str) -> list[str]:
    """ComfyUI's folders for `kind` ("diffusion_models", "text_encoders", "vae", "loras"); none outside it."""
    folder_paths = _comfy.comfy_module("folder_paths")
    return [] if folder_paths is None else folder_paths.get_folder_paths(kind)


def builtin_models(kind: str) -> dict[str, str]:
    """The built-in small model's files offered beside the user's (combo name -> path), when shipped."""
    from kontext_core.small_model import BUILTIN_PREFIX, small_model_files

    files = small_model_files()
    paths = {"diffusion_models": [files.transformer], "text_encoders": [files.t5, files.clip], "vae": [files.vae]}
    return {f"{BUILTIN_PREFIX}{p.name}": str(p) for p in paths.get(kind, []) if p.is_file()}


def list_models(kind: str) -> list[str]:
    """The combo's choices: the files of ours in the `kind` folders, as ComfyUI names them, then the built-in."""
    folder_paths = _comfy.comfy_module("folder_paths")
    names = [] if folder_paths is None else folder_paths.get_filename_list(_folder_key(folder_paths, kind))
    return sorted(names) + list(builtin_models(kind))


def check_model_name(kind: str, name: str, input_name: str) -> bool | str:
    """True, or the message ComfyUI shows when a queued prompt names a file the folder does not hold."""
    try:
        model_path(kind, name, input_name)
    except ValueError as e:
        return str(e)
    return True


def model_path(kind: str, name: str, input_name: str) -> str:
    """The file behind a combo value. Only names the listing offers are accepted, so a workflow cannot reach
    outside the model folders (no absolute paths, no `..`) nor load a file type we do not read."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"input '{input_name}' must name a file in ComfyUI's models/{kind} folder, got {name!r}")
    builtin = builtin_models(kind)
    if name in builtin:
        return builtin[name]
    folder_paths = _comfy.comfy_module("folder_paths")
    if folder_paths is not None and name in list_models(kind):
        path = folder_paths.get_full_path(_folder_key(folder_paths, kind), name)
        if path is not None:
            return path
    kinds = "/".join(MODEL_EXTENSIONS + EXTRA_EXTENSIONS.get(kind, ()))
    raise ValueError(
        f"input '{input_name}': {name!r} is not a {kinds} file in ComfyUI's models/{kind} folder "
        f"(searched: {', '.join(model_folders(kind)) or 'no folders'})"
    )
