"""The node pack without ComfyUI: specs, plumbing, and the sampler against the engine's own loop."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers.nodes import ROOT, TinyTextEncoder, TinyVAE, load_pack, random_image, use_model_folders
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

from kontext_core import sampling

from kontext_core.policy import provenance
from kontext_core.runtime.quant import Fp8Linear
from kontext_core.small_model import BUILTIN_PREFIX, small_model_files
from kontext_core.policy.styles import STYLE_PRESETS, apply_style

pack = load_pack()
nodes = sys.modules[f"{pack.__name__}.nodes"]
_comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
_adapter = sys.modules[f"{pack.__name__}.nodes._adapter"]
_models = sys.modules[f"{pack.__name__}.nodes._models"]
BY_ID = {node.NODE_ID: node for node in nodes.NODES}


def run(node_id: str, **inputs):
    return BY_ID[node_id].call(**inputs).outputs


@pytest.fixture
def encoder():
    return TinyTextEncoder(TINY_FLUX.context_in_dim, TINY_FLUX.vec_in_dim)


@pytest.fixture
def model():
    return tiny_flux_model(seed=3)


# ---------------------------------------------------------------- specs


def test_pack_imports_outside_comfyui_with_v1_fallback():
    assert pack.WEB_DIRECTORY == "./web"
    assert not hasattr(pack, "comfy_entrypoint")  # no comfy_api here: V1 mappings are the fallback
    assert set(pack.NODE_CLASS_MAPPINGS) == set(BY_ID)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["KontextCoreSampler"] == "Kontext Sampler"


def test_every_node_is_prefixed_documented_and_tooltipped():
    assert len(BY_ID) == len(nodes.NODES) == 17
    for node_id, node in BY_ID.items():
        assert (
            node_id.startswith("KontextCore") and node.DISPLAY_NAME and not node.DISPLAY_NAME.startswith("KontextCore")
        )
        assert node.DESCRIPTION and node.CATEGORY.startswith("Kontext Core/")
        assert all(spec.tooltip for spec in node.INPUTS), node_id
        assert all(out.tooltip for out in node.OUTPUTS), node_id
        assert (ROOT / "web" / "docs" / f"{node_id}.md").is_file(), node_id


def _doc_input_row(spec) -> str:
    name = f"`{spec.name}`" + (" (optional)" if spec.optional else "")
    if spec.type == "COMBO":
        kind = "choice of files" if callable(spec.options) else " / ".join(spec.choices())
    elif spec.min is not None and spec.max is not None:
        kind = f"{spec.type} ({spec.min} – {spec.max})"
    else:
        kind = spec.type
    default = "" if spec.default is None else f"`{spec.default!r}`"
    return f"| {name} | {kind} | {default} | {spec.tooltip} |"


def test_node_docs_list_what_the_nodes_have():
    """web/docs (the editor's node help) tables: each input's and output's row as the node defines it."""
    for node_id, node in BY_ID.items():
        text = (ROOT / "web" / "docs" / f"{node_id}.md").read_text()
        inputs, _, outputs = text.partition("## Outputs")
        assert [line for line in inputs.splitlines() if line.startswith("| `")] == [
            _doc_input_row(spec) for spec in node.INPUTS
        ], node_id
        assert [line for line in outputs.splitlines() if line.startswith("| `")] == [
            f"| `{out.name}` | {out.type} | {out.tooltip} |" for out in node.OUTPUTS
        ], node_id


def test_the_editor_hint_knows_the_engine_resolutions():
    """web/js keeps its own copy of the trained sizes (the browser cannot import Python): the two must agree."""
    import re

    from kontext_core.model.config import PREFERRED_KONTEXT_RESOLUTIONS

    script = (ROOT / "web" / "js" / "kontext_core.js").read_text()
    block = re.search(r"const PREFERRED = \[(.*?)\];", script, re.S).group(1)
    pairs = [(int(w), int(h)) for w, h in re.findall(r"\[(\d+), (\d+)\]", block)]
    assert pairs == PREFERRED_KONTEXT_RESOLUTIONS


def test_design_input_names():
    sampler = {spec.name: spec for spec in BY_ID["KontextCoreSampler"].INPUTS}
    assert {"seed", "steps", "guidance", "denoise", "width", "height"} <= set(sampler)
    assert (sampler["steps"].min, sampler["steps"].max) == (1, 50)
    assert sampler["seed"].control_after_generate
    names = {node_id: [s.name for s in node.INPUTS] for node_id, node in BY_ID.items()}
    assert names["KontextCoreModelLoader"][0] == "model_name"
    assert names["KontextCoreTextEncoderLoader"][:2] == ["t5_name", "clip_name"]
    assert names["KontextCoreVAELoader"] == ["vae_name"]


def test_v1_input_types_mirror_the_spec():
    types_ = pack.NODE_CLASS_MAPPINGS["KontextCoreSampler"].INPUT_TYPES()
    assert types_["required"]["steps"] == (
        "INT",
        {"tooltip": types_["required"]["steps"][1]["tooltip"], "default": 28, "min": 1, "max": 50},
    )
    assert set(types_["optional"]) == {"negative", "latent"}
    style = pack.NODE_CLASS_MAPPINGS["KontextCoreStylePreset"].INPUT_TYPES()["required"]["style"]
    assert style[0] == list(STYLE_PRESETS) and style[1]["default"] == "cinematic"
    assert pack.NODE_CLASS_MAPPINGS["KontextCoreSaveImage"].INPUT_TYPES()["hidden"] == {
        "prompt": "PROMPT",
        "extra_pnginfo": "EXTRA_PNGINFO",
        "unique_id": "UNIQUE_ID",
    }


# ---------------------------------------------------------------- conditioning


def test_text_encode_gives_core_layout(encoder):
    (cond,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt="make it red", guidance=3.0)
    txt, y = encoder.encode(["make it red"])
    assert len(cond) == 1 and set(cond[0][1]) == {"pooled_output", "guidance"}
    assert torch.equal(cond[0][0], txt) and torch.equal(cond[0][1]["pooled_output"], y)
    assert cond[0][1]["guidance"] == 3.0


def test_reference_latent_appends_raw_latents_and_method(encoder):
    (cond,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt="p", guidance=2.5)
    a, b, c = (torch.randn(1, 16, h, w) for h, w in ((4, 6), (6, 4), (2, 8)))
    (one,) = run(
        "KontextCoreReferenceLatent", conditioning=cond, latent={"samples": a}, reference_latents_method="offset"
    )
    (two,) = run(
        "KontextCoreReferenceLatent",
        conditioning=one,
        latent={"samples": b},
        latent_2={"samples": c},
        reference_latents_method="index",
    )
    refs = two[0][1]["reference_latents"]
    assert [r.data_ptr() for r in refs] == [a.data_ptr(), b.data_ptr(), c.data_ptr()]
    assert two[0][1]["reference_latents_method"] == "index"
    assert "reference_latents" not in cond[0][1] and len(one[0][1]["reference_latents"]) == 1  # inputs untouched


def test_reference_method_aliases():
    method = sys.modules[f"{pack.__name__}.nodes.conditioning"].reference_method
    assert [method(m) for m in ("offset", "index", "uxo", "uxo/uno", "uso")] == ["offset", "index", "uxo", "uxo", "uxo"]
    with pytest.raises(ValueError, match="reference_latents_method"):
        method("diagonal")


def test_reference_latent_errors_name_the_input(encoder):
    (cond,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt="p", guidance=2.5)
    with pytest.raises(ValueError, match="'latent_2'"):
        run(
            "KontextCoreReferenceLatent",
            conditioning=cond,
            latent={"samples": torch.randn(1, 16, 4, 4)},
            latent_2={"samples": torch.randn(1, 4, 4, 4)},
            reference_latents_method="offset",
        )
    with pytest.raises(ValueError, match="'reference_latents_method'"):
        run(
            "KontextCoreReferenceLatent",
            conditioning=cond,
            latent={"samples": torch.randn(1, 16, 4, 4)},
            reference_latents_method="nope",
        )


def test_style_preset_node():
    (text,) = run("KontextCoreStylePreset", prompt="a cat on a sofa", style="origami", mode="generate")
    assert text == apply_style("a cat on a sofa", "origami", "generate")
    with pytest.raises(ValueError, match="'style'"):
        run("KontextCoreStylePreset", prompt="x", style="watercolour", mode="edit")


# ---------------------------------------------------------------- sampler


def _edit_inputs(encoder, guidance=2.5, method="offset"):
    gen = torch.Generator().manual_seed(7)
    refs = [torch.randn(1, 16, 6, 4, generator=gen), torch.randn(1, 16, 4, 8, generator=gen)]
    (cond,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt="swap the hat", guidance=guidance)
    (cond,) = run(
        "KontextCoreReferenceLatent",
        conditioning=cond,
        latent={"samples": refs[0]},
        latent_2={"samples": refs[1]},
        reference_latents_method=method,
    )
    return cond, refs


# The sampler's widgets at values no test cares about; each test passes what it checks.
SAMPLER_WIDGETS = dict(
    seed=0, steps=2, guidance=-1.0, denoise=1.0, width=32, height=32, batch_size=1, true_cfg_scale=1.0
)


def run_sampler(model, positive, **widgets) -> dict:
    (latent,) = run("KontextCoreSampler", model=model, positive=positive, **(SAMPLER_WIDGETS | widgets))
    return latent


def engine_sample(model, encoder, refs, seed: int, height: int, width: int, batch: int = 1, **options):
    """What the sampler node must equal: the engine's own sample() on _edit_inputs' prompt and references."""
    txt, y = encoder.encode(["swap the hat"])
    noise = sampling.get_noise(batch, height, width, seed)
    references = [sampling.latent_to_model(r) for r in refs]
    out = sampling.sample(model, noise, txt, y, references=references, steps=2, **options)
    return sampling.latent_from_model(out)


@pytest.mark.parametrize("method", ["offset", "uxo"])
def test_sampler_equals_engine_sample(model, encoder, method):
    cond, refs = _edit_inputs(encoder, guidance=3.5, method=method)
    latent = run_sampler(model, cond, seed=11, width=48, height=32)
    expected = engine_sample(model, encoder, refs, 11, 32, 48, reference_method=method, guidance=3.5)
    assert latent["samples"].shape == (1, 16, 4, 6)
    torch.testing.assert_close(latent["samples"], expected, rtol=0, atol=0)


def test_sampler_guidance_override_and_default(model, encoder):
    cond, _ = _edit_inputs(encoder, guidance=3.5)
    stored = run_sampler(model, cond, seed=1, guidance=-1.0)
    same = run_sampler(model, cond, seed=1, guidance=3.5)
    other = run_sampler(model, cond, seed=1, guidance=1.0)
    assert torch.equal(stored["samples"], same["samples"])
    assert not torch.allclose(stored["samples"], other["samples"], atol=1e-4)
    bare = [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"]}]]  # no guidance, no references
    from_default = run_sampler(model, bare, seed=1, guidance=-1.0)
    explicit = run_sampler(model, bare, seed=1, guidance=2.5)
    assert torch.equal(from_default["samples"], explicit["samples"])


def test_sampler_latent_sets_size_and_init_with_true_cfg(model, encoder):
    cond, refs = _edit_inputs(encoder)
    (neg,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt="blurry", guidance=2.5)
    init = torch.randn(2, 16, 4, 2, generator=torch.Generator().manual_seed(5))
    cfg = dict(guidance=2.0, denoise=0.5, true_cfg_scale=2.5)
    latent = run_sampler(model, cond, negative=neg, latent={"samples": init}, seed=4, width=1024, height=1024, **cfg)
    init_latent, negative = sampling.latent_to_model(init), encoder.encode(["blurry"])
    expected = engine_sample(model, encoder, refs, 4, 32, 16, 2, init_latent=init_latent, negative=negative, **cfg)
    torch.testing.assert_close(latent["samples"], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, name",
    [
        ({"width": 40}, "'width'"),
        ({"steps": 0}, "'steps'"),
        ({"steps": 51}, "'steps'"),
        ({"true_cfg_scale": 2.0}, "'negative'"),
        ({"denoise": 0.5}, "'denoise'"),
        ({"seed": -1}, "'seed'"),
        ({"steps": 2.5}, "input 'steps' must be a whole number"),
        ({"guidance": float("nan")}, "input 'guidance' must be a finite number"),  # would sample all-NaN latents
        ({"seed": float("inf")}, "input 'seed' must be a finite number"),
        ({"positive": "not conditioning"}, "'positive'"),
        ({"model": object()}, "'model'"),
        ({"latent": {"samples": torch.zeros(1, 4, 8, 8)}}, "'latent'"),
        ({"latent": {"samples": torch.zeros(1, 16, 5, 4)}}, "input 'latent': the latent is 32×40 pixels"),
        ({"latent": {"samples": torch.zeros(1, 16, 4, 4), "noise_mask": torch.ones(1, 32, 32)}}, "noise_mask"),
    ],
)
def test_sampler_errors_name_the_input(model, encoder, change, name):
    cond, _ = _edit_inputs(encoder)
    inputs = dict(model=model, positive=cond, **SAMPLER_WIDGETS) | change
    with pytest.raises(ValueError, match=name):
        run("KontextCoreSampler", **inputs)


def test_sampler_takes_whole_floats_as_ints(model, encoder):
    """A JSON client may send 2.0 for an INT; torch needs an int for the step count and the seed."""
    cond, _ = _edit_inputs(encoder)
    floats = run_sampler(model, cond, seed=3.0, steps=2.0, batch_size=1.0)
    ints = run_sampler(model, cond, seed=3, steps=2, batch_size=1)
    assert torch.equal(floats["samples"], ints["samples"])


@pytest.mark.parametrize(
    ("references", "method", "message"),
    [
        ([torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 5, 4)], "offset", "its reference 2 is 32×40 pixels"),
        ([torch.zeros(2, 16, 4, 4)], "offset", "its reference 1 holds 2 images; expected 1 or the batch of 1"),
        ([torch.zeros(1, 4, 4, 4)], "offset", "its reference 1 is not a FLUX latent"),
        ([torch.zeros(1, 16, 4, 4)], "index_timestep_zero", "reference_latents_method must be one of"),  # core's
    ],
)
def test_sampler_names_positive_for_a_bad_reference(model, encoder, references, method, message):
    cond, _ = _edit_inputs(encoder)
    txt, meta = cond[0]
    positive = [[txt, meta | {"reference_latents": references, "reference_latents_method": method}]]
    with pytest.raises(ValueError, match=f"KontextCoreSampler: input 'positive': .*{message}"):
        run_sampler(model, positive)


class _FakeBar:
    updates: list = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        _FakeBar.updates.append((value, total))


def test_sampler_reports_progress_and_stops_on_interrupt(monkeypatch, model, encoder):
    interrupt = {"at_update": None, "checks": 0}

    class Bar(_FakeBar):
        def update_absolute(self, value, total=None, preview=None):
            super().update_absolute(value, total, preview)
            if value == interrupt["at_update"]:
                interrupt["set"] = True  # the user presses Cancel while step `value + 1` begins

    def interrupted():
        interrupt["checks"] += 1
        if interrupt.get("set"):
            raise KeyboardInterrupt("interrupted")

    management = types.SimpleNamespace(throw_exception_if_processing_interrupted=interrupted)
    fake = {"comfy.utils": types.SimpleNamespace(ProgressBar=Bar), "comfy.model_management": management}
    monkeypatch.setattr(_comfy, "comfy_module", lambda name: fake.get(name))
    blocks = len(model.double_blocks) + len(model.single_blocks)
    cond, _ = _edit_inputs(encoder)
    _FakeBar.updates, interrupt["at_update"] = [], 1
    with pytest.raises(KeyboardInterrupt):
        run_sampler(model, cond, steps=3, height=16)
    assert _FakeBar.updates == [(1, 3)]  # step 1 reported, step 2 stopped at its first block
    assert interrupt["checks"] == blocks + 1 + 1  # step 1's blocks, its callback, step 2's first block

    interrupt.update(set=True, checks=0)  # Cancel pressed before the run starts: not even one block runs
    _FakeBar.updates = []
    with pytest.raises(KeyboardInterrupt):
        run_sampler(model, cond, steps=3, height=16)
    assert _FakeBar.updates == [] and interrupt["checks"] == 1

    interrupt.update(set=False, at_update=None)
    _FakeBar.updates = []
    run_sampler(model, cond, steps=2, height=16)
    assert _FakeBar.updates == [(1, 2), (2, 2)]
    assert not any(block._forward_pre_hooks for block in (*model.double_blocks, *model.single_blocks))  # removed


# ---------------------------------------------------------------- images


def test_vae_encode_decode_raw_space_and_crop():
    vae = TinyVAE(seed=1)
    image = random_image(2, 37, 50, seed=2)
    (latent,) = run("KontextCoreVAEEncode", vae=vae, pixels=image)
    assert latent["samples"].shape == (2, 16, 4, 6)  # 37×50 center-cropped to 32×48
    cropped = image[:, 2:34, 1:49]
    # Bit-exact only for the same memory layout: a channels-last view takes another convolution kernel on some CPUs
    # (about 1e-6 apart), and the node, like the library, encodes contiguous NCHW.
    reference = vae.encode_raw(cropped.movedim(-1, 1).contiguous() * 2 - 1)
    torch.testing.assert_close(latent["samples"], reference, rtol=0, atol=0)
    (decoded,) = run("KontextCoreVAEDecode", vae=vae, samples=latent)
    assert decoded.shape == (2, 32, 48, 3) and 0 <= decoded.min() and decoded.max() <= 1
    expected = ((vae.decode_raw(latent["samples"]).clamp(-1, 1).movedim(1, -1) + 1) / 2 * 255).round() / 255
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)  # in 8-bit levels, as a saved PNG holds it
    with pytest.raises(ValueError, match="'pixels'"):
        run("KontextCoreVAEEncode", vae=vae, pixels=torch.rand(1, 8, 40, 3))
    gray = image[..., :1]  # a one-channel IMAGE is encoded as the RGB image it shows
    (from_gray,) = run("KontextCoreVAEEncode", vae=vae, pixels=gray)
    (from_rgb,) = run("KontextCoreVAEEncode", vae=vae, pixels=gray.expand(-1, -1, -1, 3))
    assert torch.equal(from_gray["samples"], from_rgb["samples"])


@pytest.mark.parametrize("mode, size", [("stretch", (1184, 880)), ("crop", (1184, 880)), ("keep", (64, 48))])
def test_image_scale_modes(mode, size):
    image = random_image(2, 45, 61, seed=0)
    (out,) = run("KontextCoreImageScale", image=image, mode=mode)
    assert out.shape == (2, size[1], size[0], 3)
    with pytest.raises(ValueError, match="'mode'"):
        run("KontextCoreImageScale", image=image, mode="fit")


def test_load_image_from_folder(monkeypatch, tmp_path):
    from PIL import Image

    (tmp_path / "batch").mkdir()
    for i, name in enumerate(["b.png", "a.png", "c.jpg", "notes.txt"]):
        path = tmp_path / "batch" / name
        if name.endswith("txt"):
            path.write_text("x")
        else:
            Image.new("RGB", (20 + i, 10), (i * 40, 7, 200)).save(path)
    monkeypatch.setattr(_comfy, "input_directory", lambda: str(tmp_path))
    image, name, count = run("KontextCoreLoadImageBatch", folder="batch", pattern="*.png", index=1)
    assert (name, count, tuple(image.shape)) == ("b", 2, (1, 10, 20, 3))
    assert image[0, 0, 0].tolist() == pytest.approx([0.0, 7 / 255, 200 / 255])
    assert run("KontextCoreLoadImageBatch", folder="batch", pattern="*", index=0)[2] == 3
    for folder in ("../", "/etc", "batch/../.."):
        with pytest.raises(ValueError, match="'folder'"):
            run("KontextCoreLoadImageBatch", folder=folder, pattern="*", index=0)
    with pytest.raises(ValueError, match="'index'"):
        run("KontextCoreLoadImageBatch", folder="batch", pattern="*.png", index=2)
    with pytest.raises(ValueError, match="'pattern'"):
        run("KontextCoreLoadImageBatch", folder="batch", pattern="../*", index=0)


def test_load_image_from_folder_reruns_when_its_file_changes(monkeypatch, tmp_path):
    """ComfyUI caches a node's outputs by its inputs; the fingerprint makes it reload a replaced file."""
    import os

    from PIL import Image

    images = sys.modules[f"{pack.__name__}.nodes.images"]
    node = images.KontextCoreLoadImageBatch
    (tmp_path / "batch").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "batch" / "a.png")
    monkeypatch.setattr(_comfy, "input_directory", lambda: str(tmp_path))
    before = node.fingerprint_inputs(folder="batch", pattern="*", index=0)
    assert node.fingerprint_inputs(folder="batch", pattern="*", index=0) == before  # unchanged: cached
    Image.new("RGB", (8, 9), (9, 9, 9)).save(tmp_path / "batch" / "a.png")
    os.utime(tmp_path / "batch" / "a.png", ns=(1, 1))
    assert node.fingerprint_inputs(folder="batch", pattern="*", index=0) != before  # replaced: rerun
    for bad in ({"folder": "../"}, {"index": 5}):  # never equal to itself, so the node runs and names the input
        value = node.fingerprint_inputs(**{"folder": "batch", "pattern": "*", "index": 0} | bad)
        assert value != value
    after = node.fingerprint_inputs(folder="batch", pattern="*", index=0)
    assert _adapter.v1_class(node).IS_CHANGED(folder="batch", pattern="*", index=0) == after  # ComfyUI's V1 name


# ---------------------------------------------------------------- loaders


def test_loader_lists_only_safetensors_and_refuses_other_names(monkeypatch, tmp_path):
    root = tmp_path / "diffusion_models"
    (root / "sub").mkdir(parents=True)
    for name in ("kontext.safetensors", "sub/fp8.sft", "kontext-Q4_K_M.gguf", "old.ckpt", "readme.txt"):
        (root / name).write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ae-Q8_0.gguf").write_bytes(b"x")  # GGUF is read for transformers only
    use_model_folders(
        monkeypatch, _comfy, {"diffusion_models": [str(root)], "vae": [str(tmp_path / "vae")]}, install=tmp_path
    )
    builtin = f"{BUILTIN_PREFIX}flux1-kontext-small.safetensors"
    assert _models.list_models("diffusion_models") == [
        "kontext-Q4_K_M.gguf",
        "kontext.safetensors",
        "sub/fp8.sft",
        builtin,
    ]
    assert _models.model_path("diffusion_models", "sub/fp8.sft", "model_name") == str(root / "sub" / "fp8.sft")
    assert _models.model_path("diffusion_models", builtin, "model_name") == str(small_model_files().transformer)
    assert _models.list_models("vae") == [f"{BUILTIN_PREFIX}ae-small.safetensors"]  # offered with no files at all
    for bad in ("old.ckpt", "../outside.safetensors", str(tmp_path / "outside.safetensors"), ""):
        with pytest.raises(ValueError, match="'model_name'"):
            _models.model_path("diffusion_models", bad, "model_name")


def test_model_loader_caches_and_switches(monkeypatch, tmp_path):
    loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    use_model_folders(
        monkeypatch,
        _comfy,
        dict.fromkeys(("diffusion_models", "text_encoders", "vae"), [str(tmp_path)]),
        install=tmp_path,
    )
    monkeypatch.setattr(loaders, "torch_device", lambda: torch.device("cpu"))
    loads = []

    def fake_load(path, *, device, dtype, **options):
        loads.append((Path(path).name, dtype, options))
        model = torch.nn.Module()  # a module without weights: the loader logs what it holds
        model.path = path
        return model

    monkeypatch.setitem(vars(loaders.kontext_core), "load_transformer", fake_load)
    monkeypatch.setattr(loaders.KontextCoreModelLoader, "_slot", _comfy.ModelSlot())
    args = dict(weight_dtype="default", compute_dtype="auto", attention="auto")
    first = run("KontextCoreModelLoader", model_name="a.safetensors", **args)[0]
    assert run("KontextCoreModelLoader", model_name="a.safetensors", **args)[0] is first
    run("KontextCoreModelLoader", model_name="b.safetensors", **args)
    run("KontextCoreModelLoader", model_name="b.safetensors", **args | {"weight_dtype": "fp8_e4m3fn"})
    keep = {"keep_fp8": True}  # 'default': an fp8 file's fp8 layers stay fp8
    assert loads == [
        ("a.safetensors", torch.float32, keep),
        ("b.safetensors", torch.float32, keep),
        ("b.safetensors", torch.float32, {"weight_dtype": torch.float8_e4m3fn}),
    ]
    assert loaders.KontextCoreModelLoader._slot.value.path.endswith("b.safetensors")
    with pytest.raises(ValueError, match="'attention'"):
        run("KontextCoreModelLoader", model_name="a.safetensors", **args | {"attention": "flash"})


def test_model_loader_keeps_an_fp8_file_fp8_by_default(monkeypatch):
    loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
    monkeypatch.setattr(loaders, "torch_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(loaders.KontextCoreModelLoader, "_slot", _comfy.ModelSlot())
    builtin = f"{BUILTIN_PREFIX}flux1-kontext-small.safetensors"  # the shipped scaled-fp8 file
    model = run(
        "KontextCoreModelLoader", model_name=builtin, weight_dtype="default", compute_dtype="fp32", attention="auto"
    )[0]
    qkv = model.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert model.compute_dtype == torch.float32


def _kohya_lora(model, seed: int, layers=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2")):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        linear = model.get_submodule(layer)
        stem = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{stem}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=gen)
        tensors[f"{stem}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=gen)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    return tensors


@pytest.fixture
def lora_folder(monkeypatch, tmp_path, model):
    from tests.helpers.flux_files import save_state

    save_state(tmp_path / "style.safetensors", _kohya_lora(model, seed=1))
    te = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
    }
    (tmp_path / "sub").mkdir()
    save_state(tmp_path / "sub" / "detail.safetensors", _kohya_lora(model, seed=2, layers=("img_in",)) | te)
    save_state(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(2, 8),
        },
    )
    use_model_folders(monkeypatch, _comfy, {"loras": [str(tmp_path)]}, install=tmp_path)
    return tmp_path


@torch.no_grad()
def test_lora_loader_leaves_the_model_and_the_sampler_applies_its_loras(model, encoder, lora_folder, capsys):
    from kontext_core.runtime.lora import apply_lora

    assert _models.list_models("loras") == ["sdxl.safetensors", "style.safetensors", "sub/detail.safetensors"]
    cond, _ = _edit_inputs(encoder)
    common = dict(seed=5, width=48, height=32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run_sampler(model, cond, **common)

    (styled,) = run("KontextCoreLoraLoader", model=model, lora_name="style.safetensors", strength=0.8)
    (both,) = run("KontextCoreLoraLoader", model=styled, lora_name="sub/detail.safetensors", strength=-0.5)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in capsys.readouterr().out  # reported, not applied
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)  # the loaders change nothing

    with_both = run_sampler(both, cond, **common)
    with_style = run_sampler(styled, cond, **common)
    plain_again = run_sampler(model, cond, **common)  # a branch without LoRAs
    assert torch.equal(plain_again["samples"], plain["samples"])
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)

    refs = cond[0][1]["reference_latents"]

    def engine(*loras):  # the library: apply_lora by hand, then the engine's own loop
        results = [apply_lora(model, lora_folder / name, strength) for name, strength in loras]
        out = engine_sample(model, encoder, refs, 5, 32, 48, guidance=2.5)
        for result in reversed(results):
            result.remove()
        return out

    assert torch.equal(with_style["samples"], engine(("style.safetensors", 0.8)))
    assert torch.equal(with_both["samples"], engine(("style.safetensors", 0.8), ("sub/detail.safetensors", -0.5)))
    assert not torch.equal(with_style["samples"], plain["samples"])
    assert not torch.equal(with_both["samples"], with_style["samples"])


def test_lora_loader_passes_strength_zero_and_refuses_other_models_loras(model, lora_folder):
    (same,) = run("KontextCoreLoraLoader", model=model, lora_name="style.safetensors", strength=0.0)
    assert same is model
    with pytest.raises(
        ValueError, match=r"KontextCoreLoraLoader: input 'lora_name': .*sdxl.safetensors.*another model"
    ):
        run("KontextCoreLoraLoader", model=model, lora_name="sdxl.safetensors", strength=1.0)
    with pytest.raises(ValueError, match="'lora_name'"):
        run("KontextCoreLoraLoader", model=model, lora_name="../elsewhere.safetensors", strength=1.0)
    assert BY_ID["KontextCoreLoraLoader"].validate_inputs(lora_name="missing.safetensors") != True  # noqa: E712
    with pytest.raises(ValueError, match="input 'model' must be a KONTEXT_MODEL"):
        run("KontextCoreLoraLoader", model="not a model", lora_name="style.safetensors", strength=1.0)


# ---------------------------------------------------------------- safety


class _Verdict:
    def __init__(self, blocked, score=0.0):
        self.blocked, self.score = blocked, score
        self.category = "violence" if blocked else None
        self.reason = "too gory" if blocked else "ok"


def test_image_filter_actions(monkeypatch):
    safety_nodes = sys.modules[f"{pack.__name__}.nodes.safety"]
    image = random_image(3, 32, 24, seed=9)
    flags = {1}
    seen_tolerance = []

    def check_image(img, tolerance):
        seen_tolerance.append(tolerance)
        index = next(i for i in range(3) if torch.equal(image[i], img))
        return _Verdict(index in flags, score=0.9 if index in flags else 0.1)

    engine = types.SimpleNamespace(check_image=check_image)
    monkeypatch.setattr(safety_nodes, "_engine", lambda: engine)
    out, flagged, report = run("KontextCoreSafetyFilterImage", image=image, tolerance=4, action="blank")
    assert flagged and torch.equal(out[0], image[0]) and torch.equal(out[2], image[2]) and out[1].max() == 0
    assert set(seen_tolerance) == {4}
    assert [r["blocked"] for r in json.loads(report)] == [False, True, False]
    assert json.loads(report)[1] == {
        "index": 1,
        "blocked": True,
        "category": "violence",
        "reason": "too gory",
        "score": 0.9,
    }
    out, _, _ = run("KontextCoreSafetyFilterImage", image=image, tolerance=2, action="blur")
    assert torch.equal(out[0], image[0]) and (out[1] - image[1]).abs().mean() > 0.1
    with pytest.raises(safety_nodes.SafetyBlockedError, match="image 1: violence"):
        run("KontextCoreSafetyFilterImage", image=image, tolerance=2, action="block")
    flags.clear()
    out, flagged, _ = run("KontextCoreSafetyFilterImage", image=image, tolerance=2, action="block")
    assert out is image and not flagged


def test_prompt_filter_actions(monkeypatch):
    safety_nodes = sys.modules[f"{pack.__name__}.nodes.safety"]
    engine = types.SimpleNamespace(check_prompt=lambda prompt, tolerance: _Verdict("gore" in prompt))
    monkeypatch.setattr(safety_nodes, "_engine", lambda: engine)
    assert run("KontextCoreSafetyFilter", prompt="a cat", tolerance=2, action="block")[:2] == ("a cat", False)
    text, flagged, report = run("KontextCoreSafetyFilter", prompt="gore", tolerance=2, action="flag")
    assert (text, flagged, json.loads(report)["category"]) == ("gore", True, "violence")
    with pytest.raises(safety_nodes.SafetyBlockedError, match="violence"):
        run("KontextCoreSafetyFilter", prompt="gore", tolerance=2, action="block")
    with pytest.raises(ValueError, match="'tolerance'"):
        run("KontextCoreSafetyFilter", prompt="a cat", tolerance=7, action="block")


# ---------------------------------------------------------------- save


def test_save_paths_number_like_comfyui(tmp_path):
    save = sys.modules[f"{pack.__name__}.nodes.save"]
    (tmp_path / "kontext").mkdir()
    (tmp_path / "kontext" / "edit_00007_.png").write_bytes(b"")
    assert save.save_paths(str(tmp_path), "kontext/edit", 2) == ("kontext", ["edit_00008_.png", "edit_00009_.png"])
    assert save.save_paths(str(tmp_path), "new", 1) == ("", ["new_00001_.png"])
    for bad in ("../up", "/abs/x", "  "):
        with pytest.raises(ValueError, match="'filename_prefix'"):
            save.save_paths(str(tmp_path), bad, 1)


def test_signing_config_from_inputs_or_env(monkeypatch, tmp_path):
    save = sys.modules[f"{pack.__name__}.nodes.save"]
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    assert save.signing_config("", "") is None
    (tmp_path / "c.pem").write_text("c")
    (tmp_path / "k.pem").write_text("k")
    monkeypatch.setattr(_comfy, "user_directory", lambda: str(tmp_path))
    assert save.signing_config("c.pem", "k.pem") == provenance.SigningConfig(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(ValueError, match="'c2pa_cert'"):
        save.signing_config("../c.pem", "k.pem")
    with pytest.raises(ValueError, match="together"):
        save.signing_config("c.pem", "")
    with pytest.raises(ValueError, match="input 'c2pa_key': .*missing.pem is not a file"):
        save.signing_config("c.pem", "missing.pem")
    monkeypatch.setenv(provenance.CERT_ENV, str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match=provenance.KEY_ENV):
        save.signing_config("", "")
    monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "gone.pem"))  # an error names where the path came from
    with pytest.raises(ValueError, match=f"environment variable {provenance.KEY_ENV}: .*gone.pem is not a file"):
        save.signing_config("", "")
    monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "k.pem"))
    assert save.signing_config("", "") == provenance.SigningConfig(tmp_path / "c.pem", tmp_path / "k.pem")


@pytest.mark.parametrize(
    ("loaders", "label"),
    [
        (
            [f"{BUILTIN_PREFIX}flux1-kontext-small.safetensors"],
            "Kontext Core's built-in small model (flux1-kontext-small.safetensors)",
        ),
        (
            ["sub/flux1-dev-kontext_fp8_scaled.safetensors"] * 2,
            "FLUX.1 Kontext (flux1-dev-kontext_fp8_scaled.safetensors)",
        ),
        (["a.safetensors", "b.safetensors"], "FLUX.1 Kontext"),  # which one made the image is not known here
        ([], "FLUX.1 Kontext"),
    ],
)
def test_saved_images_name_the_model_of_the_graph(loaders, label):
    save = sys.modules[f"{pack.__name__}.nodes.save"]
    prompt = {
        str(i): {"class_type": "KontextCoreModelLoader", "inputs": {"model_name": name}}
        for i, name in enumerate(loaders)
    }
    prompt["9"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "other.safetensors"}}
    assert save.model_label(prompt) == label
    assert save.model_label(None) == "FLUX.1 Kontext"  # run outside a queued graph


def test_saved_images_name_the_model_and_loras_upstream_of_their_save_node():
    save = sys.modules[f"{pack.__name__}.nodes.save"]
    prompt = {  # two branches: "7" saves the LoRA branch of model a, "8" the plain branch of model b
        "1": {"class_type": "KontextCoreModelLoader", "inputs": {"model_name": "a.safetensors"}},
        "2": {
            "class_type": "KontextCoreLoraLoader",
            "inputs": {"model": ["1", 0], "lora_name": "s/style.safetensors", "strength": 0.8},
        },
        "3": {
            "class_type": "KontextCoreLoraLoader",
            "inputs": {"model": ["2", 0], "lora_name": "off.safetensors", "strength": 0},
        },
        "4": {
            "class_type": "KontextCoreLoraLoader",
            "inputs": {"model": ["3", 0], "lora_name": "detail.safetensors", "strength": ["9", 0]},
        },
        "5": {"class_type": "KontextCoreSampler", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "KontextCoreModelLoader", "inputs": {"model_name": "b.safetensors"}},
        "10": {"class_type": "KontextCoreSampler", "inputs": {"model": ["6", 0]}},
        "7": {"class_type": "KontextCoreSaveImage", "inputs": {"images": ["5", 0]}},
        "8": {"class_type": "KontextCoreSaveImage", "inputs": {"images": ["10", 0]}},
        "9": {"class_type": "PrimitiveFloat", "inputs": {"value": 0.5}},
    }
    label = "FLUX.1 Kontext (a.safetensors) with LoRA detail.safetensors (0.5), style.safetensors (0.8)"
    assert save.model_label(prompt, "7") == label
    prompt["9"]["inputs"]["value"] = 0  # a linked strength of 0: the node passes the model on untouched
    assert save.model_label(prompt, "7") == "FLUX.1 Kontext (a.safetensors) with LoRA style.safetensors (0.8)"
    prompt["9"]["inputs"] = {"a": ["11", 0]}  # not knowable from the graph
    assert save.model_label(prompt, "7").endswith(
        "with LoRA detail.safetensors (strength from a linked node), style.safetensors (0.8)"
    )
    assert save.model_label(prompt, "8") == "FLUX.1 Kontext (b.safetensors)"
    assert save.model_label(prompt) == "FLUX.1 Kontext"  # save node unknown: two loaders in the graph
    assert save.model_label(prompt, "missing") == "FLUX.1 Kontext"


# ---------------------------------------------------------------- the graph equals the engine's pipeline


def test_edit_graph_matches_kontext_pipeline(model, encoder):
    mode = "keep"  # "crop"/"stretch" reach 1024-pixel sizes; their tensor/PIL agreement is in test_resize
    from PIL import Image

    from kontext_core import pipeline

    rng = torch.Generator().manual_seed(8)
    pixels = torch.randint(0, 256, (37, 53, 3), generator=rng, dtype=torch.uint8)
    vae = TinyVAE(seed=4)
    prompt = "make the sky green"
    expected = pipeline.KontextPipeline(model, vae, encoder).edit(
        Image.fromarray(pixels.numpy()), prompt, steps=2, seed=21, guidance=2.5, resize=mode
    )

    (image,) = run("KontextCoreImageScale", image=pixels[None].float() / 255.0, mode=mode)
    (latent,) = run("KontextCoreVAEEncode", vae=vae, pixels=image)
    (cond,) = run("KontextCoreTextEncode", text_encoder=encoder, prompt=prompt, guidance=2.5)
    (cond,) = run("KontextCoreReferenceLatent", conditioning=cond, latent=latent, reference_latents_method="offset")
    out = run_sampler(model, cond, latent=latent, seed=21, width=1024, height=1024)
    (decoded,) = run("KontextCoreVAEDecode", vae=vae, samples=out)
    ours = (decoded[0] * 255.0).round().to(torch.uint8)
    theirs = torch.from_numpy(np.array(expected))
    assert ours.shape == theirs.shape
    # the graph and the pipeline turn pixels into VAE inputs and back with the same float32 operations
    assert torch.equal(ours, theirs)


def test_loaders_validate_model_names_before_queueing(monkeypatch, tmp_path):
    """ComfyUI calls validate_inputs with named arguments when a prompt is queued: unknown files get a 400."""
    loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
    (tmp_path / "flux.safetensors").write_bytes(b"x")
    use_model_folders(
        monkeypatch,
        _comfy,
        dict.fromkeys(("diffusion_models", "text_encoders", "vae"), [str(tmp_path)]),
        install=tmp_path,
    )
    assert loaders.KontextCoreModelLoader.validate_inputs("flux.safetensors") is True
    message = loaders.KontextCoreModelLoader.validate_inputs("missing.safetensors")
    assert "model_name" in message and "missing.safetensors" in message
    assert "clip_name" in loaders.KontextCoreTextEncoderLoader.validate_inputs("flux.safetensors", "nope.safetensors")
    v1 = _adapter.v1_class(loaders.KontextCoreVAELoader)
    assert "vae_name" in v1.VALIDATE_INPUTS("nope.safetensors")
    import inspect

    assert list(inspect.signature(v1.VALIDATE_INPUTS).parameters) == ["vae_name"]  # no **kwargs


def test_keep_unchanged_takes_the_original_where_the_edit_did_not_reach():
    gen = torch.Generator().manual_seed(5)
    original = torch.rand(1, 24, 32, 3, generator=gen)
    edited = (original + (torch.rand(2, 24, 32, 3, generator=gen) - 0.5) * 0.05).clamp(0, 1)  # drift everywhere
    edited[:, 8:12, 10:14] = torch.tensor([1.0, 0.0, 0.0])  # and one edit
    image, changed = run("KontextCoreKeepUnchanged", original=original, edited=edited, threshold=40, grow=2)
    assert image.shape == edited.shape and changed.shape == (2, 24, 32)
    inside = torch.zeros(24, 32, dtype=torch.bool)
    inside[6:14, 8:16] = True  # the edit, grown by 2
    assert changed.bool()[:, inside].all() and not changed.bool()[:, ~inside].any()
    assert torch.equal(image[:, ~inside], original.expand_as(edited)[:, ~inside])
    assert torch.equal(image[:, inside], edited[:, inside])

    gray = original.mean(-1, keepdim=True)  # one channel: compared as RGB
    assert run("KontextCoreKeepUnchanged", original=gray, edited=gray, threshold=40, grow=0)[1].sum() == 0
    with pytest.raises(ValueError, match="'original' is 32×24 pixels and 'edited' 16×24"):
        run("KontextCoreKeepUnchanged", original=original, edited=edited[:, :, :16], threshold=40, grow=2)
    with pytest.raises(ValueError, match=r"'original' holds 2 images; expected 1, or as many as 'edited' \(3\)"):
        run("KontextCoreKeepUnchanged", original=edited, edited=torch.cat([edited, edited[:1]]), threshold=40, grow=2)
