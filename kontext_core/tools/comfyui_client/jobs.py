"""One item on one server: uploading its image, queueing the workflow, following it to its outputs."""

import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kontext_core.batch.items import BatchError, Item
from kontext_core.files import written_whole
from kontext_core.tools.comfyui_client.items import QueueError, Slots, Stalled, TimedOut, patch_workflow, seed_of
from kontext_core.tools.comfyui_client.transport import Server, WebSocket


# ---------------------------------------------------------------- following a prompt


@dataclass
class Runner:
    server: Server
    timeout: float = 600.0  # per item, from queueing to the last message
    stall_timeout: float = 120.0  # the longest silence of the websocket before the server is taken for hung
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
        except TimedOut:  # Stalled included
            # a prompt left behind would hold up every item queued after it
            self.server.cancel(prompt_id)
            raise

    def _follow(self, prompt_id: str, deadline: float, label: str) -> None:
        heard, previews = time.monotonic(), self.websocket.binary_messages
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimedOut(f"timed out after {self.timeout:g} s waiting for prompt {prompt_id} (cancelled it)")
            if previews != self.websocket.binary_messages:  # a preview image is a sign of life too
                heard, previews = now, self.websocket.binary_messages
            if now - heard > self.stall_timeout:
                raise Stalled(
                    f"no word from the server for {self.stall_timeout:g} s on prompt {prompt_id} (cancelled it)"
                )
            text = self.websocket.receive(min(deadline - now, 1.0))
            if text is None:
                continue
            heard = time.monotonic()
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


def run_item(runner: Runner, workflow: dict, slots: Slots, item: Item, key: str, out: Path, label: str) -> list[str]:
    """Runs one item on the runner's server and writes its outputs whole into `out`; returns their names.
    Raises QueueError (and the transport's URLError, OSError, ValueError) when it does not finish there."""
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
        try:
            with written_whole(out / name) as partial:
                partial.write_bytes(data)
        except OSError as e:  # this machine's disk, not the server: not a reason to take the server out
            raise BatchError(f"cannot write {out / name}: {e.strerror or e}") from None
        files.append(name)
    return files


def item_seed(workflow: dict, slots: Slots, item: Item) -> int | None:
    """The seed the item runs with: its own, or the workflow's."""
    return item.seed if item.seed is not None or slots.seed is None else seed_of(workflow, slots)
