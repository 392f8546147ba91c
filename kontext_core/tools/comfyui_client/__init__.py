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

from kontext_core.tools.comfyui_client.cli import build_parser, main
from kontext_core.tools.comfyui_client.items import (
    IMAGE_EXTENSIONS,
    STATE_FILE,
    UPLOAD_SUBFOLDER,
    Item,
    QueueError,
    Slots,
    TimedOut,
    find_slots,
    items_from_csv,
    items_from_folder,
    patch_workflow,
)
from kontext_core.tools.comfyui_client.jobs import Runner, State, run_batch
from kontext_core.tools.comfyui_client.transport import Server, WebSocket, WebSocketClosed, frame_length

__all__ = [
    "IMAGE_EXTENSIONS",
    "STATE_FILE",
    "UPLOAD_SUBFOLDER",
    "Item",
    "QueueError",
    "Runner",
    "Server",
    "Slots",
    "State",
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
    "run_batch",
]
