"""The Kontext Parallel Model Loader in a real ComfyUI on this CPU: two workers over gloo hold the model between
prompts, and the Kontext Sampler on them gives the image the plain loader's graph gives, LoRA chains included."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.helpers.comfyui_server import ROOT, ComfyServer, comfy_session

from kontext_core.tools import comfyui_client as queue
from kontext_core.tools.comfyui_client.jobs import output_images

comfy = pytest.fixture(scope="session", name="comfy")(comfy_session)
WORKER_MODULE = "kontext_core.parallel.workers"


def small_edit(prefix: str, seed: int, example: str = "small_model_edit") -> dict:
    """An example workflow at test size: 4 steps, images at their own size, outputs under `prefix`."""
    workflow = json.loads((ROOT / "workflows" / "api" / f"{example}.json").read_text())
    for node in workflow.values():
        if node["class_type"] == "KontextCoreSampler":
            node["inputs"].update(steps=4, seed=seed)
        elif node["class_type"] == "KontextCoreImageScale":
            node["inputs"]["mode"] = "keep"
        elif node["class_type"] == "KontextCoreSaveImage":
            node["inputs"]["filename_prefix"] = f"{prefix}/edit"
    return workflow


def with_lora(workflow: dict) -> dict:
    """The tiny LoRA between the model loader and the sampler."""
    from tests.helpers.tiny_files import LORA

    workflow = copy.deepcopy(workflow)
    loader = next(i for i, n in workflow.items() if n["class_type"] == "KontextCoreModelLoader")
    sampler = next(n for n in workflow.values() if n["class_type"] == "KontextCoreSampler")
    workflow["90"] = {
        "class_type": "KontextCoreLoraLoader",
        "inputs": {"model": [loader, 0], "lora_name": LORA, "strength": 0.9},
    }
    sampler["inputs"]["model"] = ["90", 0]
    return workflow


def on_workers(workflow: dict, devices: str = "cpu,cpu") -> dict:
    loader = next(n for n in workflow.values() if n["class_type"] == "KontextCoreModelLoader")
    loader["class_type"] = "KontextCoreParallelModelLoader"
    name = loader["inputs"]["model_name"]
    loader["inputs"] = {"model_name": name, "method": "ulysses", "devices": devices, "compute_dtype": "auto"}
    return workflow


def saved_pixels(comfy: ComfyServer, workflow: dict) -> np.ndarray:
    runner = comfy.runner()
    try:
        entry = runner.run_prompt(workflow)
    finally:
        runner.close()
    (image,) = output_images(entry)
    path = comfy.base / "output" / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def worker_pids(server_pid: int) -> set[int]:
    """The server's worker processes, found in /proc by their command line."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server_pid and WORKER_MODULE.encode() in cmdline:
            pids.add(int(proc.name))
    return pids


def test_the_parallel_loader_gives_the_plain_graphs_image_and_keeps_its_workers(comfy):
    plain = saved_pixels(comfy, small_edit("parallel-plain", seed=5))
    split = saved_pixels(comfy, on_workers(small_edit("parallel-split", seed=5)))
    assert len(np.unique(plain)) > 20  # a real picture
    difference = np.abs(split - plain)
    print(f"\n[parallel] max |2 workers − plain loader| = {difference.max()}/255, {(difference > 0).mean():.4%} differ")
    assert difference.max() <= 1  # 1/255: the split sums attention in another order
    workers = worker_pids(comfy.process.pid)
    assert len(workers) == 2
    saved_pixels(comfy, on_workers(small_edit("parallel-split", seed=6)))  # a new seed: the sampler runs again
    assert worker_pids(comfy.process.pid) == workers, "the same workers served the second prompt"


def test_cancel_stops_the_workers_after_a_step_and_they_serve_the_next_prompt(comfy):
    workflow = on_workers(small_edit("parallel-interrupt", seed=8))
    sampler = next(i for i, n in workflow.items() if n["class_type"] == "KontextCoreSampler")
    workflow[sampler]["inputs"]["steps"] = 50
    sent: list[float] = []

    def on_message(text: str) -> None:
        if not sent and f"node {sampler}: step" in text:  # the workers are sampling: stop them
            sent.append(time.monotonic())
            assert comfy.post_json("/interrupt", {})[0] == 200

    workers_before = worker_pids(comfy.process.pid)
    runner = comfy.runner(log=on_message)
    try:
        with pytest.raises(queue.QueueError, match=rf"interrupted at node {sampler} \(KontextCoreSampler\)"):
            runner.run_prompt(workflow)
    finally:
        runner.close()
    print(f"\n[parallel] interrupted {time.monotonic() - sent[0]:.2f} s after POST /interrupt")
    assert time.monotonic() - sent[0] < 10
    saved_pixels(comfy, on_workers(small_edit("parallel-after-interrupt", seed=9)))
    assert worker_pids(comfy.process.pid) == workers_before and len(workers_before) == 2


def test_a_lora_chain_goes_onto_the_workers_and_comes_off_again(comfy):
    tiny = small_edit("parallel-lora", seed=11, example="single_edit")  # the tiny random models: the LoRA is theirs
    plain = saved_pixels(comfy, with_lora(tiny))
    split = saved_pixels(comfy, on_workers(with_lora(tiny)))
    split_without = saved_pixels(comfy, on_workers(small_edit("parallel-lora-off", seed=11, example="single_edit")))
    print(f"\n[parallel] LoRA: max |2 workers − plain loader| = {np.abs(split - plain).max()}/255")
    assert np.abs(split - plain).max() <= 1
    assert np.abs(split - split_without).max() > 10  # it acted, and came off for the graph without it


def test_a_bad_device_list_is_refused_naming_the_input(comfy):
    runner = comfy.runner()
    try:
        with pytest.raises(queue.QueueError, match="input 'devices'"):
            runner.run_prompt(on_workers(small_edit("parallel-bad", seed=7), devices="cpu"))
    finally:
        runner.close()
