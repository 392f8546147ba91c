"""A small fake ComfyUI (HTTP + websocket on 127.0.0.1) for the batch client's tests: no ComfyUI, no torch.

`outcome(prompt)` scripts each prompt: "success", ("error", message), "interrupt", "hang", ("reject", node_errors),
"die" (the server goes away mid-prompt: connections refused from then on) or "http500" (POST /prompt answers 500).
"""

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
from collections.abc import Iterator
from contextlib import contextmanager
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kontext_core.tools import comfyui_client as queue

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
    """Answers the routes the client uses, the way ComfyUI does; `outcome(prompt)` scripts each prompt (see above).
    `port` 0 picks a free one; a closed server's port brings "the same server" back. `seconds` per prompt."""

    daemon_threads = True

    def __init__(self, websocket: bool = True, outcome=lambda prompt: "success", port: int = 0, seconds: float = 0.0):
        super().__init__(("127.0.0.1", port), Handler)
        self.websocket, self.outcome, self.seconds = websocket, outcome, seconds
        self.closed = False
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
            try:
                sock.shutdown(socket.SHUT_RDWR)  # close() alone waits for the handler's file objects
            except OSError:
                pass  # the client closed it first
            sock.close()
        self.closed = True  # only now is the port free again

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
            time.sleep(self.seconds)
            if outcome == "hang":
                continue
            if outcome == "die":
                self.close()
                return
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
            if outcome == "http500":
                self._json({"error": "Internal Server Error"}, 500)
                return
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


@contextmanager
def fake_servers() -> Iterator:
    """`make(**FakeComfy options)` for a test's servers, all closed at the end."""
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
