"""Finding the model files a user already has: explicit paths first, then a ComfyUI models folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Names from the official ComfyUI Kontext tutorial and the Hugging Face releases, most precise first.
KNOWN_FILES = {
    "transformer": (
        "diffusion_models",
        ["flux1-kontext-dev.safetensors", "flux1-dev-kontext_fp8_scaled.safetensors", "*kontext*.safetensors"],
    ),
    "t5": (
        "text_encoders",
        ["t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5*.safetensors"],
    ),
    "clip": ("text_encoders", ["clip_l.safetensors", "clip_l*.safetensors"]),
    "vae": ("vae", ["ae.safetensors", "flux_vae.safetensors", "*ae*.safetensors"]),
}


@dataclass
class ModelFiles:
    transformer: Path
    vae: Path
    t5: Path
    clip: Path
    comfyui_root: Path | None = None


def comfyui_root_from_env() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    return Path(root) if root else None


def find_in_models_folder(models_dir: Path, role: str) -> Path | None:
    """The best match for `role` ("transformer", "t5", "clip", "vae") in a ComfyUI `models/` folder."""
    sub, patterns = KNOWN_FILES[role]
    folders = [models_dir / sub]
    if sub == "diffusion_models":
        folders.append(models_dir / "unet")  # the folder's older name, still read by ComfyUI
    if sub == "text_encoders":
        folders.append(models_dir / "clip")
    for folder in folders:
        for pattern in patterns:
            found = sorted(folder.glob(pattern)) if folder.is_dir() else []
            if found:
                return found[0]
    return None


def resolve_model_files(
    *,
    transformer: str | Path | None = None,
    vae: str | Path | None = None,
    t5: str | Path | None = None,
    clip: str | Path | None = None,
    comfyui_root: str | Path | None = None,
) -> ModelFiles:
    """Explicit paths win; what is missing is looked up in `<comfyui_root>/models` (or $COMFYUI_ROOT)."""
    root = Path(comfyui_root) if comfyui_root else comfyui_root_from_env()
    chosen = {"transformer": transformer, "vae": vae, "t5": t5, "clip": clip}
    missing = []
    for role, given in chosen.items():
        if given is not None:
            chosen[role] = Path(given)
            continue
        found = find_in_models_folder(root / "models", role) if root else None
        if found is None:
            missing.append(role)
        chosen[role] = found
    if missing:
        where = f"in {root / 'models'}" if root else "(no --comfyui folder or COMFYUI_ROOT given)"
        hints = {
            "transformer": "--transformer flux1-kontext-dev.safetensors (models/diffusion_models)",
            "vae": "--vae ae.safetensors (models/vae)",
            "t5": "--t5 t5xxl_fp16.safetensors (models/text_encoders)",
            "clip": "--clip clip_l.safetensors (models/text_encoders)",
        }
        raise FileNotFoundError(
            f"model files not found {where}: "
            + "; ".join(hints[m] for m in missing)
            + ". Pass the paths, or --comfyui /path/to/ComfyUI to use its models folder."
        )
    return ModelFiles(comfyui_root=root, **chosen)
