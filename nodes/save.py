"""Saving with provenance: PNGs carrying the workflow, an AI-generated disclosure and, when configured, C2PA."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image


from . import _comfy
from ._spec import Input, KontextNode, NodeResult, image_input

if TYPE_CHECKING:
    from kontext_core.policy import provenance


def _provenance():
    # PNG metadata, C2PA and their libraries load with the first save, not with the pack
    from kontext_core.policy import provenance

    return provenance


CATEGORY = "Kontext Core/image"
# the field of each listed result naming its source image (web/js/kontext_editor.js reads it); inside the result's
# entry, not a UI output of its own, because the frontend's queue would list one as a file beside the results
SOURCE_FIELD = "kontext_source"
SOURCE_PREFIX = "kontext/source"


def inside_folder(root: str, relative: str, input_name: str) -> str:
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
    folder = inside_folder(output_dir, os.path.dirname(prefix.strip()), "filename_prefix")
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


def signing_config(c2pa_cert: str, c2pa_key: str) -> provenance.SigningConfig | None:
    """Certificate and key for C2PA: the node's paths (inside ComfyUI's user folder), else the engine's
    environment variables (`provenance.SigningConfig.from_env`), else None (no signature)."""
    provenance = _provenance()
    if bool(c2pa_cert) != bool(c2pa_key):
        raise ValueError("inputs 'c2pa_cert' and 'c2pa_key' must be given together")
    if c2pa_cert:
        user = _comfy.user_directory()
        if user is None:
            raise ValueError("inputs 'c2pa_cert'/'c2pa_key' are resolved in ComfyUI's user folder, unknown here")
        config = provenance.SigningConfig(
            Path(inside_folder(user, c2pa_cert, "c2pa_cert")), Path(inside_folder(user, c2pa_key, "c2pa_key"))
        )
        origins = ("input 'c2pa_cert'", "input 'c2pa_key'")
    else:
        try:
            config = provenance.SigningConfig.from_env()
        except provenance.ProvenanceError as e:
            raise ValueError(str(e)) from None
        if config is None:
            return None
        origins = (f"environment variable {provenance.CERT_ENV}", f"environment variable {provenance.KEY_ENV}")
    for origin, path in zip(origins, (config.cert_chain, config.private_key)):
        if not path.is_file():
            raise ValueError(f"{origin}: {path} is not a file")
    return config


def _upstream(prompt: dict, node_id) -> list[dict]:
    """The nodes of the queued graph whose outputs lead into `node_id` (links are `[node id, output index]`)."""
    seen, todo = set(), [str(node_id)]
    while todo:
        current = prompt.get(todo.pop())
        inputs = current.get("inputs") if isinstance(current, dict) else None
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and str(value[0]) not in seen:
                seen.add(str(value[0]))
                todo.append(str(value[0]))
    return [prompt[i] for i in sorted(seen)]


def model_label(prompt, node_id=None) -> str:
    """The model the saved images' metadata names: the file of the one Kontext Model Loader upstream of the save
    node `node_id` in the queued graph (ComfyUI's hidden `prompt` and `unique_id`; the whole graph when the node
    is not known), with the LoRAs upstream of it; with no loader or several, only the family, since naming one
    the images may not come from would be a false record."""
    graph = prompt if isinstance(prompt, dict) else {}
    nodes = _upstream(graph, node_id) if node_id is not None and str(node_id) in graph else list(graph.values())

    def inputs_of(class_type: str) -> list[dict]:
        return [
            n["inputs"]
            for n in nodes
            if isinstance(n, dict) and n.get("class_type") == class_type and isinstance(n.get("inputs"), dict)
        ]

    names = {i["model_name"] for i in inputs_of("KontextCoreModelLoader") if isinstance(i.get("model_name"), str)}
    if len(names) != 1:
        return "FLUX.1 Kontext"
    name = names.pop()
    from kontext_core.small_model import BUILTIN_PREFIX

    label = _provenance().model_name(name.removeprefix(BUILTIN_PREFIX), builtin=name.startswith(BUILTIN_PREFIX))
    loras = [
        (i["lora_name"], _value(graph, i.get("strength")))
        for i in inputs_of("KontextCoreLoraLoader")
        if isinstance(i.get("lora_name"), str)
    ]
    return _provenance().with_loras(label, [(n, s) for n, s in loras if s != 0])  # at 0 the node passes the model on


def _value(graph: dict, value):
    """A widget's value, or for a link the value of the node it comes from when that node holds just one
    (a primitive node); None when it cannot be known from the graph."""
    if not isinstance(value, list):
        return value
    source = graph.get(str(value[0])) if len(value) == 2 else None
    inputs = source.get("inputs") if isinstance(source, dict) else None
    literal = list(inputs.values()) if isinstance(inputs, dict) else []
    return literal[0] if len(literal) == 1 and isinstance(literal[0], (int, float)) else None


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
        Input(
            "filename_prefix",
            "STRING",
            "File name prefix; may include subfolders of the output folder.",
            default="kontext/edit",
        ),
        Input(
            "c2pa_cert",
            "STRING",
            "Optional C2PA certificate chain (PEM), relative to ComfyUI's user folder. "
            "Empty: use the KONTEXT_C2PA_CERT_CHAIN environment variable if set, else no signature.",
            default="",
        ),
        Input(
            "c2pa_key",
            "STRING",
            "Private key (PEM) for the certificate, relative to ComfyUI's user folder (or KONTEXT_C2PA_PRIVATE_KEY).",
            default="",
        ),
        Input(
            "source_image",
            "IMAGE",
            "Optional: the image that was edited. Its presence records the result as an "
            "edit (C2PA 'edited', with the source as ingredient) instead of a new creation, and gives the "
            "editor its before/after view, round history and drift.",
            optional=True,
        ),
    )
    HIDDEN = ("prompt", "extra_pnginfo", "unique_id")
    OUTPUT_NODE = True

    @classmethod
    def run(
        cls,
        images,
        filename_prefix: str,
        c2pa_cert: str = "",
        c2pa_key: str = "",
        source_image=None,
        prompt=None,
        extra_pnginfo=None,
        unique_id=None,
    ):
        images = image_input(cls, "images", images)
        signing = signing_config(c2pa_cert.strip(), c2pa_key.strip())
        sources = (
            [_to_pil(s) for s in image_input(cls, "source_image", source_image)] if source_image is not None else []
        )
        model = model_label(prompt, unique_id)
        if _comfy.metadata_disabled():  # the user's privacy choice; the AI disclosure and C2PA stay
            prompt, extra_pnginfo = None, None
        extra = dict(extra_pnginfo or {})
        workflow = extra.pop("workflow", None)
        output_dir = _comfy.output_directory()
        subfolder, names = save_paths(output_dir, filename_prefix, images.shape[0])
        saved = []
        for image, name in zip(images, names):
            path = os.path.join(output_dir, subfolder, name)
            _provenance().save_png(
                _to_pil(image),
                path,
                prompt=prompt,
                workflow=workflow,
                model=model,
                inputs=sources,
                signing=signing,
                extra_text={k: json.dumps(v) for k, v in extra.items()},
            )
            saved.append({"filename": name, "subfolder": subfolder, "type": "output"})
        if sources:
            previews = _save_previews(sources)
            for i, entry in enumerate(saved):  # one source for every image, or one each
                entry[SOURCE_FIELD] = previews[i] if len(previews) == len(saved) else previews[0]
        return NodeResult((), ui={"images": saved})


def _save_previews(images: list[Image.Image]) -> list[dict]:
    """The source images as plain PNGs in ComfyUI's temp folder (emptied at each start), for the editor's
    before/after view and its drift measure; the saved edit keeps its own record of the source (C2PA)."""
    temp = _comfy.temp_directory()
    subfolder, names = save_paths(temp, SOURCE_PREFIX, len(images))
    for image, name in zip(images, names):
        image.save(os.path.join(temp, subfolder, name), compress_level=1)
    return [{"filename": name, "subfolder": subfolder, "type": "temp"} for name in names]


def _to_pil(image) -> Image.Image:
    pixels = np.clip(image[..., :3].float().cpu().numpy() * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


NODES = [KontextCoreSaveImage]
