"""Batch client for a running ComfyUI: one API-format workflow, many images and prompts.

    python -m kontext_core.tools.comfyui_client --server http://127.0.0.1:8188 --workflow workflows/api/single_edit.json \\
        --images photos/ --prompt "Make it a watercolour painting" --out results/
    python -m kontext_core.tools.comfyui_client --workflow workflows/api/single_edit.json --csv items.csv --out results/

For each item the image is uploaded (POST /upload/image), the workflow is patched and queued (POST /prompt),
progress is followed over ComfyUI's websocket (polling /history/<id> where no websocket can be opened), and
the outputs are downloaded from /view into --out. `--out/queue_state.jsonl` records every finished item, so
a second run skips what is done and retries what failed. A rejected prompt or a failed run is reported with
ComfyUI's own error text and the batch goes on; the exit status is 1 when any item failed.

Which inputs get patched, unless --image-node / --prompt-node / --seed-node name the node ids:
  image   the one `LoadImage` node (its `image` input);
  prompt  the one node with a literal string input named `prompt` or `text`;
  seed    the one node with a literal integer input named `seed` or `noise_seed`.
Several candidates are an error listing them, so a multi-node workflow never gets a silent guess.

Standard library only (a small RFC 6455 websocket reader included), so it runs from any Python 3.10+,
without ComfyUI, torch or pip installs.
"""

from __future__ import annotations

import argparse
import base64
import copy
import csv
import hashlib
import json
import mimetypes
import os
import re
import select
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kontext_core.files import written_whole

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROMPT_INPUTS = ("prompt", "text")
SEED_INPUTS = ("seed", "noise_seed")
STATE_FILE = "queue_state.jsonl"
UPLOAD_SUBFOLDER = "kontext_queue"


class QueueError(RuntimeError):
    """One item could not be run; the message is what the user needs to fix it."""


class TimedOut(QueueError):
    pass


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    name: str  # stem of the output files, unique within a batch
    image: Path
    prompt: str | None
    seed: int | None

    def key(self, workflow: dict) -> str:
        """Identity for resuming: the image bytes, prompt, seed and workflow, so an edited row is redone, and the
        name its outputs get, so a row that moved in the CSV (names carry the row number) or a duplicate row runs
        for itself instead of taking another row's files."""
        digest = hashlib.sha256(self.image.read_bytes())
        digest.update(json.dumps([self.name, self.prompt, self.seed, workflow], sort_keys=True).encode())
        return digest.hexdigest()[:32]


def items_from_folder(folder: Path, prompt: str, seed: int | None = None) -> list[Item]:
    if not folder.is_dir():
        raise QueueError(f"--images: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise QueueError(f"--images: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [p.stem for p in files]
    # a.png and a.jpg would write the same a_0.png: such names keep their extension
    return [Item(p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix[1:]}", p, prompt, seed) for p in files]


def items_from_csv(path: Path) -> list[Item]:
    """Rows of `image,prompt,seed` (seed may be empty); image paths are relative to the CSV's folder."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0]) if rows else set()
    except OSError as e:
        raise QueueError(f"--csv: cannot read {path}: {e.strerror}") from None
    if not rows:
        raise QueueError(f"--csv: {path} has no rows (expected a header line 'image,prompt,seed' and one row per item)")
    missing = {"image", "prompt"} - columns
    if missing:
        raise QueueError(f"--csv: {path} lacks column(s) {sorted(missing)}; expected image,prompt,seed")
    items = []
    for number, row in enumerate(rows, start=1):
        where = f"--csv: {path} row {number}"
        image = path.parent / (row["image"] or "").strip()
        if not row["image"] or not image.is_file():
            raise QueueError(f"{where}: image {row['image']!r} is not a file (relative to {path.parent})")
        seed_text = (row.get("seed") or "").strip()
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise QueueError(f"{where}: seed must be a whole number, got {seed_text!r}") from None
        if seed is not None and seed < 0:
            raise QueueError(f"{where}: seed must be 0 or more, got {seed}")
        items.append(Item(f"{number:04d}_{image.stem}", image, row["prompt"], seed))
    return items


# ---------------------------------------------------------------- workflow patching


@dataclass(frozen=True)
class Slots:
    """Node ids whose inputs each item overrides (None: the workflow has no such input to patch)."""

    image: str | None
    prompt: str | None
    seed: str | None


def _candidates(workflow: dict, accept: Callable[[str, dict], str | None]) -> list[tuple[str, str]]:
    found = []
    for node_id, node in workflow.items():
        name = accept(node.get("class_type", ""), node.get("inputs", {}))
        if name is not None:
            found.append((node_id, name))
    return found


def _literal_input(names: Iterable[str], kind: type) -> Callable[[str, dict], str | None]:
    def accept(_class_type: str, inputs: dict) -> str | None:
        # a list value is a link to another node's output, not something to overwrite
        return next((n for n in names if type(inputs.get(n)) is kind), None)

    return accept


def _pick(workflow: dict, what: str, flag: str, explicit: str | None, accept) -> str | None:
    if explicit is not None:
        node = workflow.get(explicit)
        if node is None:
            raise QueueError(f"{flag}: node {explicit!r} is not in the workflow (ids: {', '.join(workflow)})")
        if accept(node.get("class_type", ""), node.get("inputs", {})) is None:
            raise QueueError(f"{flag}: node {explicit} ({node.get('class_type')}) has no literal {what} input")
        return explicit
    found = _candidates(workflow, accept)
    if len(found) > 1:
        listed = ", ".join(f"{i} ({workflow[i]['class_type']})" for i, _ in found)
        raise QueueError(f"the workflow has several {what} inputs: {listed}; choose one with {flag}")
    return found[0][0] if found else None


def find_slots(
    workflow: dict, image_node: str | None = None, prompt_node: str | None = None, seed_node: str | None = None
) -> Slots:
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise QueueError("--workflow must be an API-format workflow ({id: {class_type, inputs}}), not the UI format")

    def load_image(class_type: str, inputs: dict) -> str | None:
        return "image" if class_type == "LoadImage" and isinstance(inputs.get("image"), str) else None

    return Slots(
        image=_pick(workflow, "image (LoadImage)", "--image-node", image_node, load_image),
        prompt=_pick(workflow, "prompt", "--prompt-node", prompt_node, _literal_input(PROMPT_INPUTS, str)),
        seed=_pick(workflow, "seed", "--seed-node", seed_node, _literal_input(SEED_INPUTS, int)),
    )


def patch_workflow(workflow: dict, slots: Slots, image: str, prompt: str | None, seed: int | None) -> dict:
    """A copy of `workflow` with this item's uploaded image name, prompt and seed."""
    patched = copy.deepcopy(workflow)
    if slots.image is None:
        raise QueueError("the workflow has no LoadImage node to put the item's image in (or name one: --image-node)")
    patched[slots.image]["inputs"]["image"] = image
    for value, node, names, kind, what in (
        (prompt, slots.prompt, PROMPT_INPUTS, str, "prompt"),
        (seed, slots.seed, SEED_INPUTS, int, "seed"),
    ):
        if value is None:
            continue
        if node is None:
            raise QueueError(f"the item has a {what} but the workflow has no literal {what} input to put it in")
        inputs = patched[node]["inputs"]
        inputs[_literal_input(names, kind)("", inputs)] = value
    return patched


# ---------------------------------------------------------------- HTTP


class Server:
    """ComfyUI's HTTP API (the routes the frontend itself uses)."""

    def __init__(self, url: str, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QueueError(f"--server must be an http(s) URL such as http://127.0.0.1:8188, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, route: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url + route, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def json(self, method: str, route: str, payload: dict | None = None):
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return json.loads(self._request(method, route, body, headers))

    def check(self) -> dict:
        try:
            return self.json("GET", "/system_stats")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise QueueError(f"no ComfyUI answers at {self.url} ({getattr(e, 'reason', e)})") from None

    def upload_image(self, path: Path, name: str) -> str:
        """Uploads into input/kontext_queue/ under `name`; returns the value for LoadImage's `image`."""
        boundary = uuid.uuid4().hex
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [
            (
                f'Content-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: {content_type}',
                path.read_bytes(),
            ),
            ('Content-Disposition: form-data; name="subfolder"', UPLOAD_SUBFOLDER.encode()),
            ('Content-Disposition: form-data; name="overwrite"', b"true"),
            ('Content-Disposition: form-data; name="type"', b"input"),
        ]
        body = b"".join(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n" for head, data in parts)
        body += f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        try:
            answer = json.loads(self._request("POST", "/upload/image", body, headers))
        except urllib.error.HTTPError as e:
            raise QueueError(f"uploading {path} failed: HTTP {e.code}") from None
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]

    def queue_prompt(self, workflow: dict, client_id: str) -> str:
        try:
            answer = self.json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raise QueueError(f"ComfyUI rejected the prompt (HTTP {e.code}): {describe_rejection(e.read())}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        entry = self.json("GET", f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
        return entry or None

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request("GET", f"/view?{query}")

    def cancel(self, prompt_id: str) -> None:
        """Drops the prompt from the queue, or stops it if it is running; best effort."""
        for route in ("/queue", "/interrupt"):
            payload = {"delete": [prompt_id]} if route == "/queue" else {"prompt_id": prompt_id}
            try:
                self._request("POST", route, json.dumps(payload).encode(), {"Content-Type": "application/json"})
            except (urllib.error.URLError, OSError):
                pass


def describe_rejection(body: bytes) -> str:
    """ComfyUI's 400 body (`error` + `node_errors`) as one readable line naming the nodes and inputs."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    error = answer.get("error")
    text = [error.get("message", "") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        text[0] += f" ({error['details']})"
    for node_id, node in (answer.get("node_errors") or {}).items():
        problems = "; ".join(
            e.get("message", "") + (f": {e['details']}" if e.get("details") else "") for e in node.get("errors", [])
        )
        text.append(f"node {node_id} ({node.get('class_type', '?')}): {problems}")
    return " | ".join(t for t in text if t)


# ---------------------------------------------------------------- websocket


class WebSocketClosed(ConnectionError):
    pass


def frame_length(n: int, masked: bool) -> bytes:
    """A frame's second byte (mask bit, 7-bit length) and its extended length field (RFC 6455 §5.2)."""
    bit = 0x80 if masked else 0
    if n < 126:
        return bytes([bit | n])
    if n < 65536:
        return bytes([bit | 126]) + n.to_bytes(2, "big")
    return bytes([bit | 127]) + n.to_bytes(8, "big")


class WebSocket:
    """Just enough RFC 6455 to read ComfyUI's status messages: text frames in, pongs and a close out."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10.0):
        parsed = urllib.parse.urlsplit(url)
        secure = parsed.scheme == "wss"
        port = parsed.port or (443 if secure else 80)
        sock = socket.create_connection((parsed.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parsed.hostname)
        self.sock, self.timeout, self.buffer = sock, timeout, bytearray()
        self.binary_messages = 0  # ComfyUI's previews, counted and skipped (the integration test reads the count)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise ConnectionError(f"no websocket at {url}: {lines[0]}")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise WebSocketClosed("the server closed the websocket")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(bytes([0x80 | opcode]) + frame_length(len(payload), masked=True))
        mask = os.urandom(4)  # RFC 6455: every client frame is masked
        self.sock.sendall(mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._send(0x1, text.encode())

    def receive(self, wait: float) -> str | None:
        """The next text message, or None when nothing arrived within `wait` seconds."""
        if not self.buffer and not select.select([self.sock], [], [], wait)[0]:
            return None
        message, message_opcode = b"", None
        while True:
            first, second = self._take(2)
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            if length == 126:
                length = int.from_bytes(self._take(2), "big")
            elif length == 127:
                length = int.from_bytes(self._take(8), "big")
            mask = self._take(4) if second & 0x80 else None
            payload = self._take(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise WebSocketClosed("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            message_opcode = opcode if opcode else message_opcode
            if fin:
                if message_opcode == 0x1:
                    return message.decode()
                self.binary_messages += 1  # binary frames are ComfyUI's previews: not needed here
                return self.receive(0)

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- following a prompt


@dataclass
class Runner:
    server: Server
    timeout: float = 600.0  # per item, from queueing to the last message
    poll_interval: float = 0.5
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True))
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    websocket: WebSocket | None = None

    def connect(self) -> None:
        """Opens the websocket before anything is queued (so no message is missed), or falls back to polling."""
        url = self.server.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            self.websocket = WebSocket(url, timeout=min(self.server.timeout, 10.0))
        except OSError as e:
            self.log(f"websocket unavailable ({e}); polling /history instead")
            self.websocket = None

    def close(self) -> None:
        if self.websocket is not None:
            self.websocket.close()
            self.websocket = None

    def run_prompt(self, workflow: dict, label: str = "") -> dict:
        """Queues `workflow`, waits for it to finish and returns its /history entry; raises QueueError."""
        prompt_id = self.server.queue_prompt(workflow, self.client_id)
        deadline = time.monotonic() + self.timeout
        try:
            if self.websocket is not None:
                try:
                    self._follow(prompt_id, deadline, label)
                except (OSError, ValueError) as e:  # a dropped socket or a garbled frame: polling still works
                    self.log(f"websocket lost ({e}); polling /history instead")
                    self.websocket = None
            return self._poll(prompt_id, deadline)
        except TimedOut:
            # a prompt left behind would hold up every item queued after it
            self.server.cancel(prompt_id)
            raise

    def _follow(self, prompt_id: str, deadline: float, label: str) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut(f"timed out after {self.timeout:g} s waiting for prompt {prompt_id} (cancelled it)")
            text = self.websocket.receive(min(left, 1.0))
            if text is None:
                continue
            message = json.loads(text)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue  # the queue status, or another client's prompt
            if kind == "progress":
                self.log(f"{label} node {data.get('node')}: step {data.get('value')}/{data.get('max')}")
            elif kind in ("execution_error", "execution_interrupted"):
                raise QueueError(failure_text(kind, data))
            elif kind == "executing" and data.get("node") is None:
                return  # sent after the result is in /history

    def _poll(self, prompt_id: str, deadline: float) -> dict:
        """The /history entry once it is complete; failures are read from its status messages."""
        while True:
            entry = self.server.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry is not None and (status.get("completed") or status.get("status_str") in ("success", "error")):
                if status.get("status_str") == "error":
                    raise QueueError(history_failure(status))
                return entry
            if time.monotonic() > deadline:
                raise TimedOut(f"timed out after {self.timeout:g} s waiting for prompt {prompt_id} (cancelled it)")
            time.sleep(self.poll_interval)


def failure_text(kind: str, data: dict) -> str:
    node = f"node {data.get('node_id')} ({data.get('node_type')})"
    if kind == "execution_interrupted":
        return f"interrupted at {node}"
    return f"{node} failed: {data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}"


def history_failure(status: dict) -> str:
    for kind, data in status.get("messages") or []:
        if kind in ("execution_error", "execution_interrupted"):
            return failure_text(kind, data)
    return "the prompt ended with an error (no details in /history)"


def output_images(entry: dict) -> list[dict]:
    """The saved images of a /history entry (type "output": previews are temporary and skipped)."""
    images = []
    for node_id in sorted(entry.get("outputs") or {}, key=str):
        for image in entry["outputs"][node_id].get("images") or []:
            if image.get("type", "output") == "output":
                images.append(image)
    return images


# ---------------------------------------------------------------- the batch


class State:
    """`queue_state.jsonl`: one JSON line per finished attempt; the last line for a key wins."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: that item simply runs again
                if record.get("status") == "done":
                    self.done[record["key"]] = record
                else:
                    self.done.pop(record.get("key"), None)

    def finished(self, key: str, out: Path) -> bool:
        record = self.done.get(key)
        return record is not None and all((out / name).is_file() for name in record.get("files", []))

    def record(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if entry["status"] == "done":
            self.done[entry["key"]] = entry


def run_batch(runner: Runner, workflow: dict, slots: Slots, items: list[Item], out: Path) -> tuple[int, int, int]:
    """Runs every item not already done; returns (done now, skipped as done before, failed)."""
    out.mkdir(parents=True, exist_ok=True)
    state = State(out / STATE_FILE)
    done = skipped = failed = 0
    for number, item in enumerate(items, start=1):
        label = f"[{number}/{len(items)}] {item.name}"
        key = item.key(workflow)
        if state.finished(key, out):
            skipped += 1
            runner.log(f"{label}: done in an earlier run, skipped")
            continue
        started = time.monotonic()
        try:
            # the key in the name: a changed image never overwrites one a queued prompt still reads
            stem = re.sub(r"[^\w.-]", "_", item.image.stem)
            upload_name = f"{stem}_{key[:12]}{item.image.suffix.lower()}"
            image = runner.server.upload_image(item.image, upload_name)
            entry = runner.run_prompt(patch_workflow(workflow, slots, image, item.prompt, item.seed), label)
            images = output_images(entry)
            if not images:
                raise QueueError("the prompt finished but saved no image (does the workflow end in a save node?)")
            files = []
            for index, image_ref in enumerate(images):
                name = f"{item.name}_{index}{Path(image_ref['filename']).suffix or '.png'}"
                data = runner.server.view(image_ref)
                with written_whole(out / name) as partial:
                    partial.write_bytes(data)
                files.append(name)
        except (QueueError, urllib.error.URLError, OSError, ValueError, KeyError) as e:
            failed += 1
            reason = str(e) if isinstance(e, QueueError) else f"{type(e).__name__}: {e}"
            state.record({"key": key, "name": item.name, "image": str(item.image), "status": "failed", "error": reason})
            runner.log(f"{label}: FAILED: {reason}")
            continue
        done += 1
        seconds = time.monotonic() - started
        state.record(
            {
                "key": key,
                "name": item.name,
                "image": str(item.image),
                "status": "done",
                "files": files,
                "seconds": round(seconds, 2),
            }
        )
        runner.log(f"{label}: done in {seconds:.1f} s -> {', '.join(files)}")
    return done, skipped, failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_core.tools.comfyui_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    parser.add_argument("--workflow", required=True, type=Path, help="API-format workflow (workflows/api/*.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images, each run with --prompt")
    source.add_argument("--csv", type=Path, help="CSV with columns image,prompt,seed (seed may be empty)")
    parser.add_argument("--prompt", help="the instruction for every image of --images")
    parser.add_argument("--seed", type=int, help="seed for every image of --images (default: the workflow's)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the results and the resume state")
    parser.add_argument("--image-node", help="id of the node whose 'image' input gets the uploaded file")
    parser.add_argument("--prompt-node", help="id of the node whose 'prompt'/'text' input gets the prompt")
    parser.add_argument("--seed-node", help="id of the node whose 'seed'/'noise_seed' input gets the seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one item may take (default 600)")
    parser.add_argument("--http-timeout", type=float, default=30.0, help="seconds one HTTP request may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None and args.prompt is None:
        parser.error("--images needs --prompt")
    if args.csv is not None and (args.prompt is not None or args.seed is not None):
        parser.error("--prompt and --seed go with --images; a CSV carries them per row")
    if args.timeout <= 0 or args.http_timeout <= 0:
        parser.error("--timeout and --http-timeout must be positive")
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
        slots = find_slots(workflow, args.image_node, args.prompt_node, args.seed_node)
        if args.images is not None:
            items = items_from_folder(args.images, args.prompt, args.seed)
        else:
            items = items_from_csv(args.csv)
        server = Server(args.server, timeout=args.http_timeout)
        server.check()
    except (QueueError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = Runner(server, timeout=args.timeout)
    runner.connect()
    try:
        done, skipped, failed = run_batch(runner, workflow, slots, items, args.out)
    finally:
        runner.close()
    runner.log(f"{done} done, {skipped} already done, {failed} failed; results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
