"""Saving with provenance: PNGs carrying the workflow, an AI-generated disclosure and, when configured, C2PA."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from . import _comfy
from ._comfy import Input, KontextNode, NodeResult, image_input

CATEGORY = "Kontext Core/image"
# the engine's names, so the command line and the node sign with the same settings
CERT_ENV, KEY_ENV = "KONTEXT_C2PA_CERT_CHAIN", "KONTEXT_C2PA_PRIVATE_KEY"


def _inside(root: str, relative: str, input_name: str) -> str:
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"input '{input_name}' must stay inside {root}, got {relative!r}")
    return path


def save_paths(output_dir: str, prefix: str, count: int) -> tuple[str, list[str]]:
    """The subfolder and `count` new file names for `prefix` (which may hold subfolders), numbered as
    ComfyUI's SaveImage numbers them: `<name>_00001_.png`, continuing after the highest number present."""
    if not prefix.strip():
        raise ValueError("input 'filename_prefix' must not be empty")
    folder = _inside(output_dir, os.path.dirname(prefix.strip()), "filename_prefix")
    name = os.path.basename(prefix.strip())
    if not name:
        raise ValueError(f"input 'filename_prefix' must end in a file name, got {prefix!r}")
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_\.png$")
    taken = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    start = max(taken, default=0) + 1
    subfolder = os.path.relpath(folder, os.path.realpath(output_dir))
    return ("" if subfolder == "." else subfolder.replace(os.sep, "/")), [
        f"{name}_{start + i:05}_.png" for i in range(count)
    ]


def signing_files(c2pa_cert: str, c2pa_key: str) -> tuple[str, str] | None:
    """Certificate and key for C2PA: the node's paths (inside ComfyUI's user folder), else the
    KONTEXT_C2PA_CERT / KONTEXT_C2PA_KEY environment variables, else None (no signature)."""
    if bool(c2pa_cert) != bool(c2pa_key):
        raise ValueError("inputs 'c2pa_cert' and 'c2pa_key' must be given together")
    if c2pa_cert:
        user = _comfy.user_directory()
        if user is None:
            raise ValueError("inputs 'c2pa_cert'/'c2pa_key' are resolved in ComfyUI's user folder, unknown here")
        files = _inside(user, c2pa_cert, "c2pa_cert"), _inside(user, c2pa_key, "c2pa_key")
    elif os.environ.get(CERT_ENV) or os.environ.get(KEY_ENV):
        if not (os.environ.get(CERT_ENV) and os.environ.get(KEY_ENV)):
            raise ValueError(f"set both {CERT_ENV} and {KEY_ENV} to sign, or neither")
        files = os.environ[CERT_ENV], os.environ[KEY_ENV]
    else:
        return None
    for name, path in zip(("c2pa_cert", "c2pa_key"), files):
        if not os.path.isfile(path):
            raise ValueError(f"input '{name}': {path} is not a file")
    return files


class KontextCoreSaveImage(KontextNode):
    NODE_ID = "KontextCoreSaveImage"
    DISPLAY_NAME = "Kontext Save Image (Provenance)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Saves PNGs to ComfyUI's output folder with the workflow embedded (drag the file back in to reload it), "
        "an AI-generated disclosure, and a C2PA manifest when a signing certificate is configured."
    )
    INPUTS = (
        Input("images", "IMAGE", "The images to save."),
        Input("filename_prefix", "STRING", "File name prefix; may include subfolders of the output folder.",
              default="kontext/edit"),
        Input("c2pa_cert", "STRING", "Optional C2PA certificate chain (PEM), relative to ComfyUI's user folder. "
              "Empty: use the KONTEXT_C2PA_CERT_CHAIN environment variable if set, else no signature.", default=""),
        Input("c2pa_key", "STRING", "Private key (PEM) for the certificate, relative to ComfyUI's user folder "
              "(or KONTEXT_C2PA_PRIVATE_KEY).", default=""),
        Input("source_image", "IMAGE", "Optional: the image that was edited. Its presence records the result as an "
              "edit (C2PA 'edited', with the source as ingredient) instead of a new creation.", optional=True),
    )  # fmt: skip
    HIDDEN = ("prompt", "extra_pnginfo")
    OUTPUT_NODE = True

    @classmethod
    def run(cls, images, filename_prefix: str, c2pa_cert: str = "", c2pa_key: str = "", source_image=None,
            prompt=None, extra_pnginfo=None):  # fmt: skip
        images = image_input(cls, "images", images)
        signer = signing_files(c2pa_cert.strip(), c2pa_key.strip())
        sources = [_to_pil(s) for s in image_input(cls, "source_image", source_image)] if source_image is not None else []
        extra = dict(extra_pnginfo or {})
        workflow = extra.pop("workflow", None)
        output_dir = _comfy.output_directory()
        subfolder, names = save_paths(output_dir, filename_prefix, images.shape[0])
        from kontext_core import provenance

        signing = provenance.SigningConfig(*map(Path, signer)) if signer else None
        saved = []
        for image, name in zip(images, names):
            path = os.path.join(output_dir, subfolder, name)
            provenance.save_png(
                _to_pil(image), path, prompt=prompt, workflow=workflow, inputs=sources, signing=signing,
                extra_text={k: json.dumps(v) for k, v in extra.items()},
            )  # fmt: skip
            saved.append({"filename": name, "subfolder": subfolder, "type": "output"})
        return NodeResult((), ui={"images": saved})


def _to_pil(image) -> Image.Image:
    pixels = np.clip(image[..., :3].float().cpu().numpy() * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


NODES = [KontextCoreSaveImage]
