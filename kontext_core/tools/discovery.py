"""Finding the model files a user already has.

Each role (transformer, VAE, T5, CLIP) is looked up on its own, in this order:
1. an explicit path;
2. a ComfyUI `models/` folder (`--comfyui` / `comfyui_root=`, else $COMFYUI_ROOT);
3. the Hugging Face hub cache: a snapshot of `black-forest-labs/FLUX.1-Kontext-dev` (the single files
   `flux1-kontext-dev.safetensors` / `ae.safetensors`, else its diffusers folders), and for the text
   encoders also ComfyUI's singles repo `comfyanonymous/flux_text_encoders`.

The cache is `hf_cache=`, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, the same
rule huggingface_hub follows; nothing here imports it or touches the network.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

# Names from the official ComfyUI Kontext tutorial and the Hugging Face releases, most precise first.
KNOWN_FILES = {
    "transformer": (
        "diffusion_models",
        [
            "flux1-kontext-dev.safetensors",
            "flux1-dev-kontext_fp8_scaled.safetensors",
            "*kontext*.safetensors",
            "*kontext*.gguf",
        ],
    ),
    "t5": (
        "text_encoders",
        [
            "t5xxl_fp16.safetensors",
            "t5xxl_fp8_e4m3fn_scaled.safetensors",
            "t5xxl_fp8_e4m3fn.safetensors",
            "t5*.safetensors",
        ],
    ),
    "clip": ("text_encoders", ["clip_l.safetensors", "clip_l*.safetensors"]),
    # Not "*ae*", which takes any "*vae*": the folder holds other models' VAEs (sdxl_vae), unusable for FLUX.
    "vae": (
        "vae",
        [
            "ae.safetensors",
            "flux_vae.safetensors",
            "ae*.safetensors",
            "*flux*ae*.safetensors",
            "*kontext*ae*.safetensors",
        ],
    ),
}
ROLES = tuple(KNOWN_FILES)

KONTEXT_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
TEXT_ENCODERS_REPO = "comfyanonymous/flux_text_encoders"
# Inside a FLUX.1-Kontext-dev snapshot: the BFL single file first (no key conversion), then diffusers' folder.
KONTEXT_SNAPSHOT_FILES = {
    "transformer": ("flux1-kontext-dev.safetensors", "transformer"),
    "vae": ("ae.safetensors", "vae"),
    "t5": ("text_encoder_2",),
    "clip": ("text_encoder",),
}
# Inside a flux_text_encoders snapshot, most precise first, as ComfyUI's own folder.
TEXT_ENCODER_SNAPSHOT_FILES = {
    "t5": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn.safetensors"),
    "clip": ("clip_l.safetensors",),
}
# The tokenizer folders of a Kontext snapshot, for text encoders that have none beside them.
SNAPSHOT_TOKENIZERS = {"t5": "tokenizer_2", "clip": "tokenizer"}


@dataclass
class ModelFiles:
    transformer: Path
    vae: Path
    t5: Path
    clip: Path
    comfyui_root: Path | None = None
    # Set when a text encoder came from the HF cache as a single file, which has no tokenizer beside it.
    t5_tokenizer: Path | None = None
    clip_tokenizer: Path | None = None
    # Where each role was found: "explicit", "comfyui" or "hf-cache".
    sources: dict[str, str] = field(default_factory=dict)


def comfyui_root_from_env() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    return Path(root) if root else None


def hf_cache_dir(hf_cache: str | Path | None = None) -> Path:
    """The Hugging Face hub cache folder: `hf_cache`, else $HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    if hf_cache:
        return Path(hf_cache).expanduser()
    # HUGGINGFACE_HUB_CACHE is the variable's older name, still honoured by huggingface_hub.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def hf_snapshots(cache: Path, repo_id: str) -> list[Path]:
    """The snapshot folders of `repo_id` in `cache`: the one `refs/main` names first, then newest first."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots_dir = repo_dir / "snapshots"
    if not snapshots_dir.is_dir():
        return []
    snapshots = sorted((p for p in snapshots_dir.iterdir() if p.is_dir()), key=lambda p: (-p.stat().st_mtime, p.name))
    ref = repo_dir / "refs" / "main"
    main_rev = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    preferred = [p for p in snapshots if p.name == main_rev]
    return preferred + [p for p in snapshots if p.name != main_rev]


def _has_weights(folder: Path) -> bool:
    # a snapshot fetched with allow_patterns may hold only configs; such a folder cannot be loaded
    return folder.is_dir() and any(p.is_file() for p in folder.glob("*.safetensors"))


def _usable(path: Path) -> bool:
    # `is_file` follows the snapshot's symlink, so a link to a deleted or unfinished blob does not count
    return path.is_file() if path.suffix == ".safetensors" else _has_weights(path)


def find_in_hf_cache(cache: Path, role: str) -> Path | None:
    """The best match for `role` in the Hugging Face cache `cache`, or None."""
    places = [(KONTEXT_REPO, KONTEXT_SNAPSHOT_FILES[role])]
    if role in TEXT_ENCODER_SNAPSHOT_FILES:
        places.append((TEXT_ENCODERS_REPO, TEXT_ENCODER_SNAPSHOT_FILES[role]))
    for repo_id, names in places:
        for snapshot in hf_snapshots(cache, repo_id):
            for name in names:
                if _usable(snapshot / name):
                    return snapshot / name
    return None


def _snapshot_tokenizer(cache: Path, role: str) -> Path | None:
    for snapshot in hf_snapshots(cache, KONTEXT_REPO):
        folder = snapshot / SNAPSHOT_TOKENIZERS[role]
        if folder.is_dir():
            return folder
    return None


def find_in_models_folder(models_dir: Path, role: str) -> Path | None:
    """The best match for `role` ("transformer", "t5", "clip", "vae") in a ComfyUI `models/` folder."""
    sub, patterns = KNOWN_FILES[role]
    folders = [models_dir / sub]
    if sub == "diffusion_models":
        folders.append(models_dir / "unet")  # the folder's older name, still read by ComfyUI
    if sub == "text_encoders":
        folders.append(models_dir / "clip")
    for folder in folders:
        # ComfyUI lists subfolders too (vae/FLUX1/ae.safetensors); names match whatever their case (Flux_vae)
        files = [
            f
            for ext in ("safetensors", "gguf")
            for glob in (f"*.{ext}", f"*/*.{ext}")
            for f in sorted(folder.glob(glob))
        ]
        for pattern in patterns:
            found = [f for f in files if fnmatch.fnmatchcase(f.name.lower(), pattern)]
            if found:
                return found[0]
    return None


def _missing_message(missing: list[str], root: Path | None, cache: Path) -> str:
    where = f"in {root / 'models'}" if root else "in a ComfyUI folder (no --comfyui folder or COMFYUI_ROOT given)"
    hints = {
        "transformer": "--transformer flux1-kontext-dev.safetensors (models/diffusion_models)",
        "vae": "--vae ae.safetensors (models/vae)",
        "t5": "--t5 t5xxl_fp16.safetensors (models/text_encoders)",
        "clip": "--clip clip_l.safetensors (models/text_encoders)",
    }
    return (
        f"model files not found {where} nor in the Hugging Face cache ({cache}): "
        + "; ".join(hints[m] for m in missing)
        + ". Pass the paths, or --comfyui /path/to/ComfyUI to use its models folder, or download them with "
        "`python -m kontext_core fetch --comfyui /path/to/ComfyUI` (FLUX.1 Kontext [dev] is gated: accept its "
        f"license at https://huggingface.co/{KONTEXT_REPO} first)."
    )


def resolve_model_files(
    *,
    transformer: str | Path | None = None,
    vae: str | Path | None = None,
    t5: str | Path | None = None,
    clip: str | Path | None = None,
    comfyui_root: str | Path | None = None,
    hf_cache: str | Path | None = None,
) -> ModelFiles:
    """Explicit paths win; what is missing is looked up in `<comfyui_root>/models` (or $COMFYUI_ROOT), then in
    the Hugging Face cache (`hf_cache`, else the environment's). Raises FileNotFoundError naming what is missing."""
    if comfyui_root and not Path(comfyui_root).is_dir():  # a typo must not quietly fall through to the HF cache
        raise FileNotFoundError(
            f"comfyui_root (--comfyui): {comfyui_root} is not a folder (expected a ComfyUI install)"
        )
    root = Path(comfyui_root) if comfyui_root else comfyui_root_from_env()
    cache = hf_cache_dir(hf_cache)
    given = {"transformer": transformer, "vae": vae, "t5": t5, "clip": clip}
    absent = [
        f"{role} (--{role}): {path}" for role, path in given.items() if path is not None and not Path(path).exists()
    ]
    if absent:  # all of them at once, not one per run
        raise FileNotFoundError(f"not found: {'; '.join(absent)}")
    chosen: dict[str, Path | None] = {}
    sources: dict[str, str] = {}
    for role in ROLES:
        if given[role] is not None:
            chosen[role], sources[role] = Path(given[role]), "explicit"
        elif root and (found := find_in_models_folder(root / "models", role)):
            chosen[role], sources[role] = found, "comfyui"
        elif found := find_in_hf_cache(cache, role):
            chosen[role], sources[role] = found, "hf-cache"
        else:
            chosen[role] = None
    missing = [role for role in ROLES if chosen[role] is None]
    if missing:
        raise FileNotFoundError(_missing_message(missing, root, cache))
    tokenizers = {
        role: _snapshot_tokenizer(cache, role)
        for role in ("t5", "clip")
        if sources[role] == "hf-cache" and chosen[role].is_file()
    }
    return ModelFiles(
        comfyui_root=root,
        t5_tokenizer=tokenizers.get("t5"),
        clip_tokenizer=tokenizers.get("clip"),
        sources=sources,
        **chosen,
    )


def any_model_configured(
    *, comfyui_root: str | Path | None = None, hf_cache: str | Path | None = None, **paths: str | Path | None
) -> bool:
    """Whether the user has pointed at, or has, any real FLUX.1 Kontext model: an explicit path for any role
    (`paths`: transformer=, vae=, t5=, clip=, as `resolve_model_files` takes them),
    an explicit `comfyui_root` (the user asked for that folder, so a missing file there is an error to name,
    not a reason to swap models), $COMFYUI_ROOT whose models/ holds a transformer (the variable may be set for
    other tools), or a transformer in a Hugging Face cache snapshot. When False, a caller may fall back to the
    built-in small model; when True, `resolve_model_files` with the same arguments either succeeds or names
    what is missing."""
    unknown = sorted(set(paths) - set(ROLES))
    if unknown:
        raise TypeError(f"any_model_configured: {', '.join(unknown)} is not a model role ({', '.join(ROLES)})")
    if comfyui_root is not None or any(p is not None for p in paths.values()):
        return True
    root = comfyui_root_from_env()
    if root and find_in_models_folder(root / "models", "transformer"):
        return True
    return find_in_hf_cache(hf_cache_dir(hf_cache), "transformer") is not None
