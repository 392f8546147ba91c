"""Example workflows: UI files and API twins describe the same valid graph, and the API graphs run."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from tests.helpers.nodes import ROOT, TinyTextEncoder, TinyVAE, load_pack
from PIL import Image
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model
from tests.helpers.workflows import OURS, execute, host_folders, load

import kontext_core
from kontext_core.policy import provenance

pack = load_pack()
_comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
_spec = sys.modules[f"{pack.__name__}.nodes._spec"]
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# core nodes the workflows may use: input sockets, output types, widget names (None: a UI-only widget)
CORE = {
    "LoadImage": ({}, ["IMAGE", "MASK"], ["image", None]),
    "PreviewImage": ({"images": "IMAGE"}, [], []),
    "SaveImage": ({"images": "IMAGE"}, [], ["filename_prefix"]),
}
NAMES = [
    "batch_folder",
    "multi_reference",
    "multi_round_edit",
    "multi_round_keep_unchanged",
    "safety_filtered_edit",
    "single_edit",
    "small_model_edit",
    "style_preset",
    "text_to_image",
]


def widget_names(node_type: str) -> list[str | None]:
    if node_type in CORE:
        return CORE[node_type][2]
    names = []
    for spec in OURS[node_type].INPUTS:
        if spec.type in WIDGETS:
            names += [spec.name, None] if spec.control_after_generate else [spec.name]
    return names


def output_types(node_type: str) -> list[str]:
    return CORE[node_type][1] if node_type in CORE else [out.type for out in OURS[node_type].OUTPUTS]


def input_type(node_type: str, name: str) -> str:
    if node_type in CORE:
        return CORE[node_type][0][name]
    return next(spec.type for spec in OURS[node_type].INPUTS if spec.name == name)


def test_the_workflow_set_is_complete():
    assert sorted(p.stem for p in (ROOT / "workflows").glob("*.json")) == NAMES
    assert sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_describe_the_same_graph(name):
    ui, api = load(name)
    assert ui["version"] == 0.4 and isinstance(ui["links"], list)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert {str(i): n["type"] for i, n in nodes.items()} == {i: n["class_type"] for i, n in api.items()}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])

    ui_links = {}
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        socket = nodes[dst]["inputs"][dst_slot]
        assert socket["link"] == link_id, f"{name}: link {link_id} not on its target input"
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"{name}: link {link_id} not on its source"
        assert type_ == output_types(nodes[src]["type"])[src_slot] == input_type(nodes[dst]["type"], socket["name"])
        ui_links[(dst, socket["name"])] = [str(src), src_slot]
    linked_inputs = {i["link"] for n in nodes.values() for i in n["inputs"] if i["link"] is not None}
    linked_outputs = {lk for n in nodes.values() for o in n["outputs"] for lk in o["links"]}
    assert linked_inputs == linked_outputs == {link[0] for link in ui["links"]}, f"{name}: dangling links"

    for node_id, node in nodes.items():
        api_inputs = api[str(node_id)]["inputs"]
        api_links = {k: v for k, v in api_inputs.items() if isinstance(v, list)}
        assert api_links == {k[1]: v for k, v in ui_links.items() if k[0] == node_id}, f"{name}: node {node_id}"
        names = widget_names(node["type"])
        assert len(node["widgets_values"]) == len(names), f"{name}: node {node_id} widget count"
        values = {n: v for n, v in zip(names, node["widgets_values"]) if n is not None and n not in api_links}
        assert values == {k: v for k, v in api_inputs.items() if k not in api_links}, f"{name}: node {node_id}"


@pytest.mark.parametrize("name", NAMES)
def test_edits_are_saved_as_edits_of_their_source(name):
    """An edited image's provenance names the image it was made from (C2PA 'edited'), a generated one none."""
    _, api = load(name)
    edits = any(node["class_type"] == "KontextCoreVAEEncode" for node in api.values())
    saves = {i: n for i, n in api.items() if n["class_type"] == "KontextCoreSaveImage"}
    assert saves, name
    for node_id, node in saves.items():
        assert ("source_image" in node["inputs"]) == edits, f"{name}: node {node_id}"


@pytest.mark.parametrize("name", NAMES)
def test_api_graph_is_valid_for_our_nodes(name):
    _, api = load(name)
    for node_id, node in api.items():
        if node["class_type"] in CORE:
            continue
        spec = OURS[node["class_type"]]
        missing = [s.name for s in spec.INPUTS if not s.optional and s.name not in node["inputs"]]
        assert not missing, f"{name}: node {node_id} lacks {missing}"
        values = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        for s in spec.INPUTS:  # widget values within the spec (combos of files are checked when run)
            if s.name in values and (s.type != "COMBO" or not callable(s.options)):
                _spec.check_inputs(
                    types.SimpleNamespace(NODE_ID=spec.NODE_ID, INPUTS=(s,), HIDDEN=()), {s.name: values[s.name]}
                )
        for link in (v for v in node["inputs"].values() if isinstance(v, list)):
            assert link[0] in api, f"{name}: node {node_id} links to missing node {link[0]}"


def test_multi_round_rounds_edit_the_previous_result():
    _, api = load("multi_round_edit")
    samplers = sorted((int(i), n) for i, n in api.items() if n["class_type"] == "KontextCoreSampler")
    assert len(samplers) >= 3
    for (prev_id, _), (_, sampler) in zip(samplers, samplers[1:]):
        reference = api[sampler["inputs"]["positive"][0]]
        assert reference["class_type"] == "KontextCoreReferenceLatent"
        encode = api[reference["inputs"]["latent"][0]]
        decode = api[encode["inputs"]["pixels"][0]]
        # edits the previous result's image (as the editor's Edit again does from its saved file)
        assert (encode["class_type"], decode["class_type"]) == ("KontextCoreVAEEncode", "KontextCoreVAEDecode")
        assert decode["inputs"]["samples"] == [str(prev_id), 0]
        assert sampler["inputs"]["latent"] == reference["inputs"]["latent"]  # and keeps its size


# ---------------------------------------------------------------- running the API graphs with tiny models


@pytest.fixture
def tiny_comfy(monkeypatch, tmp_path):
    """Model folders with placeholder files whose loaders return tiny models; an input folder with images."""
    for kind in ("diffusion_models", "text_encoders", "vae"):
        (tmp_path / kind).mkdir()
    for kind, name in [
        ("diffusion_models", "flux1-kontext-dev.safetensors"),
        ("text_encoders", "t5xxl_fp16.safetensors"),
        ("text_encoders", "clip_l.safetensors"),
        ("vae", "ae.safetensors"),
    ]:
        (tmp_path / kind / name).write_bytes(b"placeholder")
    (tmp_path / "input" / "batch").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [
        ("kontext_example.png", (40, 24)),
        ("kontext_character.png", (24, 32)),
        ("kontext_object.png", (32, 32)),
        ("batch/a.png", (24, 24)),
        ("batch/b.png", (40, 24)),
        ("kontext_small_scene.png", (64, 48)),
    ]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "input" / name)
    host_folders(monkeypatch, tmp_path)
    monkeypatch.setitem(vars(kontext_core), "load_transformer", lambda path, **kw: tiny_flux_model(seed=1))
    monkeypatch.setitem(vars(kontext_core), "load_vae", lambda path, **kw: TinyVAE(seed=2))
    monkeypatch.setitem(
        vars(kontext_core),
        "load_text_encoder",
        lambda **kw: TinyTextEncoder(TINY_FLUX.context_in_dim, TINY_FLUX.vec_in_dim),
    )
    safe = types.SimpleNamespace(blocked=False, category=None, reason="ok", score=0.01)
    engine = types.SimpleNamespace(check_prompt=lambda p, tolerance: safe, check_image=lambda i, tolerance: safe)
    monkeypatch.setattr(sys.modules[f"{pack.__name__}.nodes.safety"], "_engine", lambda: engine)
    saved = []
    monkeypatch.setattr(provenance, "save_png", lambda image, path, **kw: saved.append((path, image.size, kw)))
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    return tmp_path, saved


@pytest.mark.parametrize("name", NAMES)
def test_api_graph_runs_with_tiny_models(tiny_comfy, name):
    tmp_path, saved = tiny_comfy
    _, api = load(name)
    for node in api.values():  # two steps and small outputs keep this fast; nothing else changes
        if node["class_type"] == "KontextCoreSampler":
            node["inputs"] |= {"steps": 2, "width": 48, "height": 32}
        if node["class_type"] == "KontextCoreImageScale":
            node["inputs"]["mode"] = "keep"
    execute(api, tmp_path / "input")
    saves = [n for n in api.values() if n["class_type"] == "KontextCoreSaveImage"]
    assert len(saved) == len(saves) >= 1
    assert all(kw["prompt"] is api for _, _, kw in saved)
    assert all(len(kw["inputs"]) == (name != "text_to_image") for _, _, kw in saved)  # an edit names its source
    if name == "text_to_image":
        assert saved[0][1] == (48, 32)
    if name.startswith("multi_round"):
        assert len({size for _, size, _ in saved}) == 1  # size locked across rounds
    if name == "batch_folder":
        assert saved[0][0].endswith("a_00001_.png")


def test_kept_rounds_edit_the_previous_kept_result():
    _, api = load("multi_round_keep_unchanged")
    keeps = sorted(int(i) for i, n in api.items() if n["class_type"] == "KontextCoreKeepUnchanged")
    assert len(keeps) >= 3
    for keep in (api[str(k)] for k in keeps):
        sampler = api[api[keep["inputs"]["edited"][0]]["inputs"]["samples"][0]]
        encode = api[sampler["inputs"]["latent"][0]]
        # the pixels put back are those of the image this round edited
        assert (
            encode["class_type"] == "KontextCoreVAEEncode" and encode["inputs"]["pixels"] == keep["inputs"]["original"]
        )
    for previous, following in zip(keeps, keeps[1:]):
        assert api[str(following)]["inputs"]["original"] == [str(previous), 0]  # the next round edits the kept image
