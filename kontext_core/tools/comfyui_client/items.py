"""The batch's items (a folder or a CSV) and the workflow inputs each one patches."""

import copy
import csv
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


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
