"""Batch client for a running ComfyUI: one API-format workflow, many images and prompts.

    python -m kontext_core.tools.comfyui_client --server http://127.0.0.1:8188 --workflow workflows/api/single_edit.json \\
        --images photos/ --prompt "Make it a watercolour painting" --out results/
    python -m kontext_core.tools.comfyui_client --workflow workflows/api/single_edit.json --csv items.csv --out results/ \\
        --server http://gpu0:8188 --server http://gpu1:8188

For each item the image is uploaded (POST /upload/image), the workflow is patched and queued (POST /prompt),
progress is followed over ComfyUI's websocket (polling /history/<id> where no websocket can be opened), and
the outputs are downloaded from /view into --out. `--out/manifest.jsonl` has a line for every finished item
(item, image, prompt, seed, attempts, seconds, output, sha256, server), so a second run skips what is done and
retries what failed. With several servers each runs one item at a time; one that dies, hangs or answers errors
leaves the rotation and its item runs on another (fleet.py). A rejected prompt or a failed run is reported with
ComfyUI's own error text and the batch goes on; the exit status is 1 when any item failed.

Which inputs get patched, unless --image-node / --prompt-node / --seed-node name the node ids:
  image   the one `LoadImage` node (its `image` input);
  prompt  the one node with a literal string input named `prompt` or `text`;
  seed    the one node with a literal integer input named `seed` or `noise_seed`.
Several candidates are an error listing them, so a multi-node workflow never gets a silent guess.

Standard library only (a small RFC 6455 websocket reader included), so it runs from any Python 3.10+,
without ComfyUI, torch or pip installs.
"""

from kontext_core.batch.items import IMAGE_EXTENSIONS, BatchError, Item, items_from_csv, items_from_folder
from kontext_core.batch.manifest import MANIFEST_FILE
from kontext_core.tools.comfyui_client.cli import build_parser, main
from kontext_core.tools.comfyui_client.fleet import FleetBatch, Member
from kontext_core.tools.comfyui_client.items import (
    UPLOAD_SUBFOLDER,
    QueueError,
    ServerFault,
    Slots,
    Stalled,
    TimedOut,
    find_slots,
    patch_workflow,
)
from kontext_core.tools.comfyui_client.jobs import Runner, run_item
from kontext_core.tools.comfyui_client.transport import Server, WebSocket, WebSocketClosed, frame_length

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_FILE",
    "UPLOAD_SUBFOLDER",
    "BatchError",
    "FleetBatch",
    "Item",
    "Member",
    "QueueError",
    "Runner",
    "Server",
    "ServerFault",
    "Slots",
    "Stalled",
    "TimedOut",
    "WebSocket",
    "WebSocketClosed",
    "build_parser",
    "find_slots",
    "frame_length",
    "items_from_csv",
    "items_from_folder",
    "main",
    "patch_workflow",
    "run_item",
]
