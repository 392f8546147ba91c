"""The batch client against a small fake ComfyUI (HTTP + websocket on 127.0.0.1): no ComfyUI, no torch."""

from __future__ import annotations

import base64
import hashlib
import json
import queue as queue_module
import random
import socket
import threading
import time
import urllib.parse
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kontext_core.tools import comfyui_client as queue

ROOT = Path(__file__).resolve().parents[1]

# a workflow shaped like ours: loader, image, text, sampler, save
WORKFLOW = {
    "1": {"class_type": "KontextCoreModelLoader", "inputs": {"model_name": "m.safetensors"}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "13": {"class_type": "KontextCoreTextEncode", "inputs": {"prompt": "old prompt", "guidance": 2.5}},
    "15": {"class_type": "KontextCoreSampler", "inputs": {"seed": 7, "steps": 28, "model": ["1", 0]}},
    "17": {"class_type": "KontextCoreSaveImage", "inputs": {"filename_prefix": "kontext/edit", "images": ["15", 0]}},
}


# ---------------------------------------------------------------- the fake server


class FakeComfy(ThreadingHTTPServer):
    """Answers the routes the client uses, the way ComfyUI does. `outcome(prompt)` scripts each prompt:
    "success", ("error", message), "interrupt", "hang" or ("reject", node_errors)."""

    daemon_threads = True

    def __init__(self, websocket: bool = True, outcome=lambda prompt: "success"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.websocket, self.outcome = websocket, outcome
        self.uploads: dict[str, bytes] = {}
        self.prompts: list[dict] = []  # the POST /prompt bodies that were accepted
        self.history: dict[str, dict] = {}
        self.outputs: dict[str, bytes] = {}
        self.sockets: dict[str, socket.socket] = {}
        self.cancelled: list[tuple[str, dict]] = []
        self.pongs: list[bytes] = []
        self.texts: list[str] = []  # text frames the client sent
        self.lock = threading.Lock()
        self.work: queue_module.Queue = queue_module.Queue()
        threading.Thread(target=self.serve_forever, daemon=True).start()
        threading.Thread(target=self._worker, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        for sock in list(self.sockets.values()):
            sock.close()

    # ---- websocket frames (server side: unmasked)
    def send_frame(self, client_id: str, opcode: int, payload: bytes, fin: bool = True) -> None:
        sock = self.sockets.get(client_id)
        if sock is None:
            return
        with self.lock:
            sock.sendall(bytes([(0x80 if fin else 0) | opcode]) + queue.frame_length(len(payload), False) + payload)

    def send(self, client_id: str, kind: str, data: dict) -> None:
        self.send_frame(client_id, 0x1, json.dumps({"type": kind, "data": data}).encode())

    # ---- the execution thread, one prompt at a time like ComfyUI's
    def _worker(self) -> None:
        while True:
            prompt_id, body, outcome = self.work.get()
            client, prompt = body.get("client_id"), body["prompt"]
            self.send(client, "execution_start", {"prompt_id": prompt_id})
            # what a real server mixes in: a ping, a binary preview, a fragmented and a very long text message
            self.send_frame(client, 0x9, b"are you there")
            self.send_frame(client, 0x2, b"\x00\x00\x00\x01" + random.randbytes(300))
            progress = {"value": 1, "max": 2, "prompt_id": prompt_id, "node": "15"}
            part = json.dumps({"type": "progress", "data": progress})
            self.send_frame(client, 0x1, part[:20].encode(), fin=False)
            self.send_frame(client, 0x0, part[20:].encode())
            self.send(client, "status", {"status": {"exec_info": {"queue_remaining": 1}}, "padding": "x" * 70_000})
            self.send(client, "progress", {"value": 2, "max": 2, "prompt_id": prompt_id, "node": "15"})
            messages = [["execution_start", {"prompt_id": prompt_id}]]
            if outcome == "hang":
                continue
            if outcome == "success":
                image = prompt["10"]["inputs"]["image"]
                name = f"edit_{len(self.outputs):05d}_.png"
                self.outputs[name] = (
                    self.uploads[image]
                    + json.dumps([prompt["13"]["inputs"]["prompt"], prompt["15"]["inputs"]["seed"]]).encode()
                )
                outputs = {
                    "17": {"images": [{"filename": name, "subfolder": "kontext", "type": "output"}]},
                    "20": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]},
                }
                self.send(client, "execution_success", {"prompt_id": prompt_id})
                status = {"status_str": "success", "completed": True, "messages": messages}
            else:
                outputs = {}
                if outcome == "interrupt":
                    data = {"prompt_id": prompt_id, "node_id": "15", "node_type": "KontextCoreSampler"}
                    kind = "execution_interrupted"
                else:
                    data = {
                        "prompt_id": prompt_id,
                        "node_id": "15",
                        "node_type": "KontextCoreSampler",
                        "exception_type": "ValueError",
                        "exception_message": outcome[1],
                    }
                    kind = "execution_error"
                messages.append([kind, data])
                self.send(client, kind, data)
                status = {"status_str": "error", "completed": False, "messages": messages}
            self.history[prompt_id] = {"prompt": [0, prompt_id, prompt, {}, []], "outputs": outputs, "status": status}
            self.send(client, "executing", {"node": None, "prompt_id": prompt_id})


class Handler(BaseHTTPRequestHandler):
    server: FakeComfy

    def log_message(self, *args) -> None:
        pass

    def _json(self, payload, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers["Content-Length"]))

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/system_stats":
            self._json({"system": {"comfyui_version": "fake"}})
        elif url.path == "/ws" and self.server.websocket:
            self._websocket(query["clientId"])
        elif url.path.startswith("/history/"):
            prompt_id = url.path.rsplit("/", 1)[1]
            entry = self.server.history.get(prompt_id)
            self._json({prompt_id: entry} if entry else {})
        elif url.path == "/view" and query.get("type") == "output" and query["filename"] in self.server.outputs:
            assert query["subfolder"] == "kontext"
            body = self.server.outputs[query["filename"]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._json({}, 404)

    def do_POST(self) -> None:
        if self.path == "/upload/image":
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            fields = {}
            for part in BytesParser().parsebytes(head + self._body()).get_payload():
                name = part.get_param("name", header="content-disposition")
                fields[name] = (part.get_filename(), part.get_payload(decode=True))
            assert fields["type"][1] == b"input" and fields["overwrite"][1] == b"true"
            subfolder = fields["subfolder"][1].decode()
            filename, data = fields["image"]
            self.server.uploads[f"{subfolder}/{filename}"] = data
            self._json({"name": filename, "subfolder": subfolder, "type": "input"})
        elif self.path == "/prompt":
            body = json.loads(self._body())
            outcome = self.server.outcome(body["prompt"])
            if isinstance(outcome, tuple) and outcome[0] == "reject":
                error = {
                    "type": "prompt_outputs_failed_validation",
                    "message": "Prompt outputs failed validation",
                    "details": "",
                    "extra_info": {},
                }
                self._json({"error": error, "node_errors": outcome[1]}, 400)
                return
            prompt_id = f"p{len(self.server.prompts)}"
            self.server.prompts.append(body)
            self.server.work.put((prompt_id, body, outcome))
            self._json({"prompt_id": prompt_id, "number": len(self.server.prompts), "node_errors": {}})
        elif self.path in ("/queue", "/interrupt"):
            self.server.cancelled.append((self.path, json.loads(self._body())))
            self._json({})
        else:
            self._json({}, 404)

    def _websocket(self, client_id: str) -> None:
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + queue.WebSocket.GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.server.sockets[client_id] = self.connection
        self.server.send(client_id, "status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id})
        while True:  # read the client's (masked) frames until it closes
            try:
                first, second = self.rfile.read(2)
                length = second & 0x7F
                if length >= 126:
                    length = int.from_bytes(self.rfile.read(2 if length == 126 else 8), "big")
                assert second & 0x80, "client frames must be masked"
                payload_mask = self.rfile.read(4)
                payload = bytes(b ^ payload_mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            except (OSError, ValueError):
                return
            if first & 0x0F == 0x1:
                self.server.texts.append(payload.decode())
            if first & 0x0F == 0xA:
                self.server.pongs.append(payload)
            if first & 0x0F == 0x8:
                return


@pytest.fixture
def make_server():
    servers = []

    def make(**kwargs) -> FakeComfy:
        servers.append(FakeComfy(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img_{index}.png"
        path.write_bytes(rng.randbytes(rng.randrange(50, 400)))  # the client never decodes them
        paths.append(path)
    return paths


def write_workflow(tmp_path: Path, workflow: dict = WORKFLOW) -> Path:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return path


def run_cli(server: FakeComfy, tmp_path: Path, *extra: str) -> int:
    return queue.main(
        ["--server", server.url, "--workflow", str(write_workflow(tmp_path)), "--out", str(tmp_path / "out"), *extra]
    )


def state_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / queue.STATE_FILE).read_text().splitlines()]


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
        [queue.STATE_FILE] + [f"{image.stem}_0.png" for image in images]
    )
    assert [line["status"] for line in state_lines(tmp_path)] == ["done"] * 3
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
    assert [line["status"] for line in state_lines(tmp_path)] == ["done", "failed", "done"]
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
        with pytest.raises(queue.QueueError, match=message):
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
