"""Safety filters for prompts and images: block, or let through with a flag and a report."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageFilter

# the filter itself (its rules and word lists) loads on the first check: see _engine
from kontext_core.policy.tolerance import DEFAULT_TOLERANCE, MAX_TOLERANCE, MIN_TOLERANCE, TOLERANCE_HELP

from ._spec import Input, KontextNode, Output, image_input

CATEGORY = "Kontext Core/safety"


class SafetyBlockedError(RuntimeError):
    """Raised to stop the workflow when a filter set to 'block' finds something."""


def _engine():
    # the engine's checks behind one seam, which the tests replace with a fake classifier (the real one loads
    # only when an image is checked)
    from kontext_core.policy import safety

    return safety


def _verdict_record(verdict, index: int | None = None) -> dict:
    record = {"blocked": bool(verdict.blocked), "category": verdict.category, "reason": verdict.reason}
    if getattr(verdict, "score", None) is not None:
        record["score"] = round(float(verdict.score), 4)
    if index is not None:
        record = {"index": index, **record}
    return record


class KontextCoreSafetyFilter(KontextNode):
    NODE_ID = "KontextCoreSafetyFilter"
    DISPLAY_NAME = "Kontext Safety Filter (Prompt)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Checks a prompt before it is encoded. 'block' stops the workflow with the reason; 'flag' passes the "
        "prompt on and reports the verdict."
    )
    INPUTS = (
        Input("prompt", "STRING", "The prompt to check.", default="", multiline=True),
        Input("tolerance", "INT", TOLERANCE_HELP, default=DEFAULT_TOLERANCE, min=MIN_TOLERANCE, max=MAX_TOLERANCE),
        Input(
            "action",
            "COMBO",
            "'block' raises an error and stops the run; 'flag' only reports.",
            default="block",
            options=("block", "flag"),
        ),
    )
    OUTPUTS = (
        Output("STRING", "prompt", "The prompt, unchanged."),
        Output("BOOLEAN", "flagged", "True when the prompt would be blocked at this tolerance."),
        Output("STRING", "report", "The verdict as JSON: blocked, category, reason."),
    )

    @classmethod
    def run(cls, prompt: str, tolerance: int = 2, action: str = "block"):
        verdict = _engine().check_prompt(prompt, tolerance=tolerance)
        if verdict.blocked and action == "block":
            raise SafetyBlockedError(f"Kontext Safety Filter blocked the prompt ({verdict.category}): {verdict.reason}")
        return (prompt, bool(verdict.blocked), json.dumps(_verdict_record(verdict)))


def _hide(image: torch.Tensor, how: str) -> torch.Tensor:
    """One [H, W, C] image made unrecognisable: a blur wide enough to remove detail, or black."""
    if how == "blank":
        return torch.zeros_like(image)
    pixels = np.clip(image.float().cpu().numpy() * 255.0, 0, 255).round().astype(np.uint8)
    radius = max(image.shape[0], image.shape[1]) / 16
    blurred = Image.fromarray(pixels[..., :3]).filter(ImageFilter.GaussianBlur(radius))
    out = torch.from_numpy(np.asarray(blurred, dtype=np.float32) / 255.0)
    if image.shape[-1] == 4:
        out = torch.cat((out, image[..., 3:].float().cpu()), dim=-1)
    return out.to(image.device, image.dtype)


class KontextCoreSafetyFilterImage(KontextNode):
    NODE_ID = "KontextCoreSafetyFilterImage"
    DISPLAY_NAME = "Kontext Safety Filter (Image)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Checks every image of a batch with the image classifier (input images before editing, results after). "
        "'block' stops the workflow; 'blur' and 'blank' hide only the flagged images and pass the rest on."
    )
    INPUTS = (
        Input("image", "IMAGE", "The image batch to check."),
        Input("tolerance", "INT", TOLERANCE_HELP, default=DEFAULT_TOLERANCE, min=MIN_TOLERANCE, max=MAX_TOLERANCE),
        Input(
            "action",
            "COMBO",
            "'block' raises an error; 'blur' blurs flagged images beyond recognition; "
            "'blank' replaces them with black.",
            default="block",
            options=("block", "blur", "blank"),
        ),
    )
    OUTPUTS = (
        Output("IMAGE", "image", "The batch, flagged images hidden (unless the action is 'block')."),
        Output("BOOLEAN", "flagged", "True when any image was flagged."),
        Output("STRING", "report", "Per-image verdicts as JSON: index, blocked, category, score, reason."),
    )

    @classmethod
    def run(cls, image, tolerance: int = 2, action: str = "block"):
        image = image_input(cls, "image", image)
        safety = _engine()
        verdicts = [safety.check_image(image[i], tolerance=tolerance) for i in range(image.shape[0])]
        flagged = [i for i, v in enumerate(verdicts) if v.blocked]
        report = json.dumps([_verdict_record(v, i) for i, v in enumerate(verdicts)])
        if flagged and action == "block":
            first = verdicts[flagged[0]]
            raise SafetyBlockedError(
                f"Kontext Safety Filter blocked {len(flagged)} of {image.shape[0]} image(s) "
                f"(image {flagged[0]}: {first.category}, score {first.score:.2f}): {first.reason}"
            )
        if flagged:
            image = image.clone()
            for i in flagged:
                image[i] = _hide(image[i], action)
        return (image, bool(flagged), report)


NODES = [KontextCoreSafetyFilter, KontextCoreSafetyFilterImage]
