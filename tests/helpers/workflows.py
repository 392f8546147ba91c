"""Running the shipped API workflows outside ComfyUI: the files, a host's folders, and a minimal executor."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image

from tests.helpers.nodes import ROOT, load_pack, use_model_folders

pack = load_pack()
_comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
OURS = {node.NODE_ID: node for node in sys.modules[f"{pack.__name__}.nodes"].NODES}


def load(name: str) -> tuple[dict, dict]:
    return (
        json.loads((ROOT / "workflows" / f"{name}.json").read_text()),
        json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()),
    )


def host_folders(monkeypatch, tmp_path) -> None:
    """ComfyUI's model, input, output and temp folders under tmp_path; loaders on the CPU with empty caches."""
    kinds = ("diffusion_models", "text_encoders", "vae", "loras")
    use_model_folders(monkeypatch, _comfy, {kind: [str(tmp_path / kind)] for kind in kinds}, install=tmp_path)
    loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
    monkeypatch.setattr(loaders, "torch_device", lambda: torch.device("cpu"))
    for node in loaders.NODES:
        if hasattr(node, "_slot"):
            monkeypatch.setattr(node, "_slot", _comfy.ModelSlot())


def execute(api: dict, input_dir) -> dict:
    """A minimal stand-in for ComfyUI's executor: every node once, inputs resolved through the links."""
    results = {}

    def value(node_id: str):
        if node_id not in results:
            node = api[node_id]
            inputs = {k: value(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if node["class_type"] == "LoadImage":
                image = np.asarray(Image.open(input_dir / inputs["image"]).convert("RGB"), dtype=np.float32)
                results[node_id] = (torch.from_numpy(image / 255.0)[None], None)
            else:
                hidden = {"prompt": api, "extra_pnginfo": {}} if OURS[node["class_type"]].HIDDEN else {}
                results[node_id] = OURS[node["class_type"]].call(**inputs, **hidden).outputs
        return results[node_id]

    for node_id in api:
        value(node_id)
    return results
