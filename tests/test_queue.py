"""The batch client against a small fake ComfyUI (HTTP + websocket on 127.0.0.1): no ComfyUI, no torch."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from tests.helpers.fake_comfyui import WORKFLOW, FakeComfy, fake_servers, make_images, write_workflow

from kontext_core.tools import comfyui_client as queue

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_server():
    with fake_servers() as make:
        yield make


def run_cli(server: FakeComfy, tmp_path: Path, *extra: str) -> int:
    return queue.main(
        ["--server", server.url, "--workflow", str(write_workflow(tmp_path)), "--out", str(tmp_path / "out"), *extra]
    )


def manifest_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / queue.MANIFEST_FILE).read_text().splitlines()]


# ---------------------------------------------------------------- whole batches


def test_folder_batch_uploads_patches_queues_and_downloads_every_image(make_server, tmp_path, capsys):
    server = make_server()
    images = make_images(tmp_path / "in", 3)
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "Make it red", "--seed", "42") == 0

    assert len(server.prompts) == 3
    client_ids = {body["client_id"] for body in server.prompts}
    assert len(client_ids) == 1 and client_ids <= set(server.sockets)  # followed over its own websocket
    for image, body in zip(images, server.prompts):
        prompt = body["prompt"]
        uploaded = prompt["10"]["inputs"]["image"]
        assert uploaded.startswith(f"{queue.UPLOAD_SUBFOLDER}/{image.stem}_") and uploaded.endswith(".png")
        assert server.uploads[uploaded] == image.read_bytes()
        assert prompt["13"]["inputs"]["prompt"] == "Make it red" and prompt["15"]["inputs"]["seed"] == 42
        assert {k: v for k, v in prompt.items() if k not in ("10", "13", "15")} == {
            k: v for k, v in WORKFLOW.items() if k not in ("10", "13", "15")
        }
        # the saved output, not the temporary preview, lands in --out under the image's name
        assert (tmp_path / "out" / f"{image.stem}_0.png").read_bytes() == image.read_bytes() + b'["Make it red", 42]'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [queue.MANIFEST_FILE] + [f"{image.stem}_0.png" for image in images]
    )
    lines = manifest_lines(tmp_path)
    assert [line["item"] for line in lines] == [image.name for image in images]
    for line, image in zip(lines, images):
        output = tmp_path / "out" / line["output"]
        assert (
            line["output"] == f"{image.stem}_0.png"
            and line["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
        )
        assert (line["image"], line["prompt"], line["seed"], line["attempts"]) == (str(image), "Make it red", 42, 1)
        assert line["server"] == server.url and 0 <= line["seconds"] < 5
    assert server.pongs and set(server.pongs) == {b"are you there"}
    err = capsys.readouterr().err
    assert "step 1/2" in err and "step 2/2" in err  # the fragmented progress message was read whole
    assert "3 done, 0 already done, 0 failed" in err


def test_a_failed_item_is_reported_the_batch_goes_on_and_a_rerun_resumes(make_server, tmp_path, capsys):
    make_images(tmp_path / "in", 3)

    def second_fails(prompt):
        failing = prompt["10"]["inputs"]["image"].split("/")[1].startswith("img_1_")
        return ("error", "input 'latent' must be a FLUX LATENT") if failing else "success"

    server = make_server(outcome=second_fails)
    args = ("--images", str(tmp_path / "in"), "--prompt", "p")
    assert run_cli(server, tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert (
        "[2/3] img_1: FAILED: node 15 (KontextCoreSampler) failed: ValueError: input 'latent' must be a FLUX LATENT"
    ) in err
    assert "2 done, 0 already done, 1 failed" in err
    assert [line["output"] for line in manifest_lines(tmp_path)] == ["img_0_0.png", "img_2_0.png"]
    assert not (tmp_path / "out" / "img_1_0.png").exists()

    healthy = make_server()
    assert run_cli(healthy, tmp_path, *args) == 0
    assert [body["prompt"]["10"]["inputs"]["image"].split("/")[1][:6] for body in healthy.prompts] == ["img_1_"]
    assert "1 done, 2 already done, 0 failed" in capsys.readouterr().err

    # everything done: nothing is queued; a lost output file brings its item back
    again = make_server()
    assert run_cli(again, tmp_path, *args) == 0 and again.prompts == []
    (tmp_path / "out" / "img_2_0.png").unlink()
    assert run_cli(again, tmp_path, *args) == 0 and len(again.prompts) == 1
    assert (tmp_path / "out" / "img_2_0.png").exists()


def test_a_changed_prompt_or_image_is_not_taken_for_done(make_server, tmp_path):
    images = make_images(tmp_path / "in", 2)
    server = make_server()
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "one") == 0
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "two") == 0
    images[0].write_bytes(b"new pixels")
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "two") == 0
    assert len(server.prompts) == 5


def test_a_row_inserted_above_others_never_hands_them_its_result(make_server, tmp_path):
    make_images(tmp_path, 2)
    csv_path = tmp_path / "items.csv"
    server = make_server()
    csv_path.write_text("image,prompt\nimg_0.png,red\n")
    assert run_cli(server, tmp_path, "--csv", str(csv_path)) == 0
    csv_path.write_text("image,prompt\nimg_1.png,green\nimg_0.png,red\nimg_0.png,red\n")  # inserted, duplicated
    assert run_cli(server, tmp_path, "--csv", str(csv_path)) == 0
    out = tmp_path / "out"
    for name, prompt in (("0001_img_1", "green"), ("0002_img_0", "red"), ("0003_img_0", "red")):
        # the fake server's output is the uploaded image followed by the prompt: each file holds its own row's
        assert (out / f"{name}_0.png").read_bytes().endswith(f'["{prompt}", 7]'.encode()), name  # 7: its seed
    assert (out / "0002_img_0_0.png").read_bytes() == (tmp_path / "img_0.png").read_bytes() + b'["red", 7]'


def test_a_rejected_prompt_reports_comfyuis_node_errors(make_server, tmp_path, capsys):
    node_errors = {
        "15": {
            "errors": [
                {
                    "type": "value_smaller_than_min",
                    "message": "Value 0 smaller than min of 1",
                    "details": "steps",
                    "extra_info": {},
                }
            ],
            "dependent_outputs": ["17"],
            "class_type": "KontextCoreSampler",
        }
    }
    server = make_server(outcome=lambda p: ("reject", node_errors) if p["15"]["inputs"]["seed"] == 1 else "success")
    csv_path = tmp_path / "items.csv"
    make_images(tmp_path, 2)
    csv_path.write_text('image,prompt,seed\nimg_0.png,first,1\nimg_1.png,"second, with a comma",\n')
    assert run_cli(server, tmp_path, "--csv", str(csv_path)) == 1
    err = capsys.readouterr().err
    assert (
        "[1/2] 0001_img_0: FAILED: ComfyUI rejected the prompt (HTTP 400): Prompt outputs failed validation | "
        "node 15 (KontextCoreSampler): Value 0 smaller than min of 1: steps"
    ) in err
    # the second row ran with its own prompt and the workflow's seed (its seed cell is empty)
    assert [(b["prompt"]["13"]["inputs"]["prompt"], b["prompt"]["15"]["inputs"]["seed"]) for b in server.prompts] == [
        ("second, with a comma", 7)
    ]
    assert (tmp_path / "out" / "0002_img_1_0.png").exists()


def test_without_a_websocket_the_client_polls_history(make_server, tmp_path, capsys):
    server = make_server(websocket=False)
    make_images(tmp_path / "in", 2)
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "p") == 0
    err = capsys.readouterr().err
    assert "polling /history" in err and "2 done" in err
    assert server.sockets == {}


def test_polling_reports_failures_from_the_history_status(make_server, tmp_path, capsys):
    server = make_server(websocket=False, outcome=lambda prompt: ("error", "out of memory"))
    make_images(tmp_path / "in", 1)
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "p") == 1
    assert "FAILED: node 15 (KontextCoreSampler) failed: ValueError: out of memory" in capsys.readouterr().err


def test_an_interrupted_prompt_fails_its_item(make_server, tmp_path, capsys):
    server = make_server(outcome=lambda prompt: "interrupt")
    make_images(tmp_path / "in", 1)
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "p") == 1
    assert "FAILED: interrupted at node 15 (KontextCoreSampler)" in capsys.readouterr().err


@pytest.mark.parametrize("websocket", [True, False])
def test_a_stuck_prompt_times_out_is_cancelled_and_the_batch_goes_on(make_server, tmp_path, capsys, websocket):
    server = make_server(websocket=websocket, outcome=lambda prompt: "hang" if not server.prompts else "success")
    make_images(tmp_path / "in", 2)
    started = time.monotonic()
    assert run_cli(server, tmp_path, "--images", str(tmp_path / "in"), "--prompt", "p", "--timeout", "1") == 1
    assert time.monotonic() - started < 5
    assert "FAILED: timed out after 1 s waiting for prompt p0 (cancelled it)" in capsys.readouterr().err
    assert server.cancelled == [("/queue", {"delete": ["p0"]}), ("/interrupt", {"prompt_id": "p0"})]


def test_the_websocket_sends_text_of_every_length_framing(make_server):
    server = make_server()
    runner = queue.Runner(queue.Server(server.url), log=lambda text: None)
    runner.connect()
    sent = ["short", "m" * 300, "l" * 70_000]  # 7-bit, 16-bit and 64-bit length fields
    for text in sent:
        runner.websocket.send(text)
    deadline = time.monotonic() + 5
    while len(server.texts) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.close()
    assert server.texts == sent


# ---------------------------------------------------------------- finding what to patch


def test_slots_are_found_by_node_type_and_input_names():
    assert queue.find_slots(WORKFLOW) == queue.Slots(image="10", prompt="13", seed="15")
    # core nodes: CLIPTextEncode's `text`, KSamplerAdvanced's `noise_seed`; linked inputs are not candidates
    core = {
        "4": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 0]}},
        "6": {"class_type": "StyleNode", "inputs": {"prompt": ["5", 0]}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 3, "seed": ["9", 0]}},
    }
    assert queue.find_slots(core) == queue.Slots(image="4", prompt="5", seed="7")
    patched = queue.patch_workflow(core, queue.find_slots(core), "kontext_queue/x.png", "a dog", 11)
    assert patched["4"]["inputs"]["image"] == "kontext_queue/x.png"
    assert patched["5"]["inputs"] == {"text": "a dog", "clip": ["1", 0]}
    assert patched["7"]["inputs"] == {"noise_seed": 11, "seed": ["9", 0]}
    assert core["5"]["inputs"]["text"] == "a cat"  # the template is untouched


def test_ambiguous_slots_need_an_explicit_node_id():
    workflow = json.loads(json.dumps(WORKFLOW))
    workflow["23"] = {"class_type": "KontextCoreTextEncode", "inputs": {"prompt": "round two"}}
    with pytest.raises(queue.QueueError, match=r"several prompt inputs: 13 \(KontextCoreTextEncode\), 23 .*--prompt-"):
        queue.find_slots(workflow)
    assert queue.find_slots(workflow, prompt_node="23").prompt == "23"
    with pytest.raises(queue.QueueError, match="--prompt-node: node '99' is not in the workflow"):
        queue.find_slots(workflow, prompt_node="99")
    with pytest.raises(queue.QueueError, match=r"--seed-node: node 13 \(KontextCoreTextEncode\) has no literal seed"):
        queue.find_slots(workflow, prompt_node="23", seed_node="13")


def test_missing_slots_are_errors_only_when_an_item_needs_them():
    no_image = {k: v for k, v in WORKFLOW.items() if k != "10"}
    slots = queue.find_slots(no_image)
    assert slots.image is None
    with pytest.raises(queue.QueueError, match="no LoadImage node"):
        queue.patch_workflow(no_image, slots, "x.png", "p", None)
    no_seed = {k: v for k, v in WORKFLOW.items() if k != "15"}
    slots = queue.find_slots(no_seed)
    assert queue.patch_workflow(no_seed, slots, "x.png", "p", None)["13"]["inputs"]["prompt"] == "p"
    with pytest.raises(queue.QueueError, match="the item has a seed but the workflow has no literal seed input"):
        queue.patch_workflow(no_seed, slots, "x.png", "p", 5)


def test_ui_format_workflows_are_refused():
    ui = json.loads((ROOT / "workflows" / "single_edit.json").read_text())
    with pytest.raises(queue.QueueError, match="API-format workflow"):
        queue.find_slots(ui)


def test_the_single_image_example_workflows_need_no_node_ids():
    """The README's batch command works on these without --image-node/--prompt-node/--seed-node."""
    for name in ("single_edit", "style_preset", "safety_filtered_edit"):
        workflow = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        slots = queue.find_slots(workflow)
        assert workflow[slots.image]["class_type"] == "LoadImage", name
        assert slots.prompt is not None and slots.seed is not None, name


# ---------------------------------------------------------------- inputs and usage


def test_folder_items_have_distinct_names(tmp_path):
    for name in ("b.png", "a.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    items = queue.items_from_folder(tmp_path, "p", 3)
    assert [(i.name, i.image.name, i.prompt, i.seed) for i in items] == [
        ("a_jpg", "a.jpg", "p", 3),
        ("a_png", "a.png", "p", 3),
        ("b", "b.png", "p", 3),
    ]


def test_csv_rows_become_items_with_clear_errors(tmp_path):
    make_images(tmp_path / "pics", 2)
    good = tmp_path / "items.csv"
    good.write_text("image,prompt,seed\npics/img_1.png,make it blue,5\npics/img_0.png,make it green,\n")
    items = queue.items_from_csv(good)
    assert [(i.name, i.image, i.prompt, i.seed) for i in items] == [
        ("0001_img_1", tmp_path / "pics" / "img_1.png", "make it blue", 5),
        ("0002_img_0", tmp_path / "pics" / "img_0.png", "make it green", None),
    ]
    for text, message in [
        ("picture,prompt\na.png,x\n", r"lacks column\(s\) \['image'\]"),
        ("image,prompt,seed\n", "has no rows"),
        ("image,prompt,seed\npics/missing.png,x,1\n", "row 1: image 'pics/missing.png' is not a file"),
        ("image,prompt,seed\npics/img_0.png,x,1\npics/img_1.png,x,1.5\n", "row 2: seed must be a whole number"),
        ("image,prompt,seed\npics/img_0.png,x,-3\n", "row 1: seed must be 0 or more"),
    ]:
        good.write_text(text)
        with pytest.raises(queue.BatchError, match=message):
            queue.items_from_csv(good)


def test_usage_errors_exit_with_status_2(tmp_path, capsys):
    make_images(tmp_path / "in", 1)
    workflow = str(write_workflow(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        queue.main(["--workflow", workflow, "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "--images needs --prompt" in capsys.readouterr().err

    batch = ["--workflow", workflow, "--images", str(tmp_path / "in"), "--prompt", "p", "--out", str(tmp_path / "o")]
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert queue.main(["--server", closed, *batch]) == 2
    assert f"error: no ComfyUI answers at {closed}" in capsys.readouterr().err

    assert queue.main(["--server", "ftp://x", *batch]) == 2
    assert "--server must be an http(s) URL" in capsys.readouterr().err
    nowhere = ["--workflow", workflow, "--images", str(tmp_path / "nowhere"), "--prompt", "p"]
    assert queue.main([*nowhere, "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_client_needs_nothing_beyond_the_standard_library():
    # the docstring's promise: it runs from any Python, e.g. ComfyUI's embedded one, without torch or pip installs
    import subprocess
    import sys

    code = (
        "import sys, kontext_core.tools.comfyui_client; print(sorted({m.split('.')[0] for m in sys.modules}"
        " - set(sys.stdlib_module_names) - {'kontext_core', '__main__'}))"
    )
    # -S: no site-packages at all, so an import of anything installed fails instead of being listed
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "[]"
