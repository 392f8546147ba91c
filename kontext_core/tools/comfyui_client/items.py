"""The workflow inputs each item patches, and the errors of one item on one server."""

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kontext_core.batch.items import BatchError

PROMPT_INPUTS = ("prompt", "text")
SEED_INPUTS = ("seed", "noise_seed")
UPLOAD_SUBFOLDER = "kontext_queue"


class QueueError(BatchError):
    """One item could not be run on one server; the message is what the user needs to fix it."""


class TimedOut(QueueError):
    """The item took longer than its timeout (the server kept working on it)."""


class Stalled(TimedOut):
    """The server sent nothing at all for the stall timeout while running the item: it is taken for hung."""


class ServerFault(QueueError):
    """The server answered with an error of its own (HTTP 5xx), whatever the item."""


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


def seed_of(workflow: dict, slots: Slots) -> int | None:
    """The seed a (patched) workflow runs with, for the manifest."""
    if slots.seed is None:
        return None
    inputs = workflow[slots.seed]["inputs"]
    return inputs[_literal_input(SEED_INPUTS, int)("", inputs)]
