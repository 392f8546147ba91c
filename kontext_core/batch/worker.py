"""One `KontextPipeline` editing a batch's items, in this process or as a Ray actor: image bytes in, PNG bytes out,
so a worker on another machine needs none of the driver's files."""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kontext_core.batch.items import BatchError


class ItemRefused(BatchError):
    """The safety checks refused the item's image or its result: running it elsewhere would not change that."""


@dataclass(frozen=True)
class EditSettings:
    """What every item of a batch is edited with (the `edit` command's defaults)."""

    steps: int = 28
    guidance: float = 2.5
    resize: str | None = None  # None: the pipeline's own default (stretch, or keep for the small model)
    reference_method: str = "offset"
    safety_tolerance: int | None = 2  # None: no image checks (the prompts are checked before the batch starts)


@dataclass(frozen=True)
class EditJob:
    name: str
    image: bytes  # the input file's bytes
    prompt: str
    seed: int


@dataclass(frozen=True)
class EditResult:
    png: bytes
    seconds: float


class EditWorker:
    """Loads the model once (the `edit` command's model options: `model_args`), then edits job after job."""

    def __init__(self, model_args: argparse.Namespace, settings: EditSettings):
        from kontext_core.cli.models import add_loras, load_pipeline, wants_small_model
        from kontext_core.policy import safety

        self.settings = settings
        self.pipe, model = load_pipeline(model_args, wants_small_model(model_args))
        self.model = add_loras(self.pipe, model_args.lora, model)
        self.checks = settings.safety_tolerance is not None and safety.image_classifier_installed()
        if self.checks:
            safety.require_image_classifier()

    def ready(self) -> str:
        """The model's name, once it is loaded (a Ray driver waits on this before handing out items)."""
        return self.model

    def edit(self, job: EditJob) -> EditResult:
        from PIL import Image

        from kontext_core.cli.outputs import made_by, save_image

        started = time.monotonic()
        try:
            image = Image.open(io.BytesIO(job.image)).convert("RGB")
        except (OSError, ValueError) as e:
            raise BatchError(f"{job.name}: the image cannot be read ({e})") from None
        self._check(image, "its image")
        s = self.settings
        sampling = {
            "steps": s.steps,
            "guidance": s.guidance,
            "resize": s.resize,
            "reference_method": s.reference_method,
        }
        result = self.pipe.edit(image, job.prompt, seed=job.seed, **sampling)
        self._check(result, "its result")
        record = made_by(self.model, job.prompt, [image], steps=s.steps, seed=job.seed, guidance=s.guidance)
        with tempfile.TemporaryDirectory() as folder:
            path = save_image(result, Path(folder) / "out.png", record)
            return EditResult(path.read_bytes(), time.monotonic() - started)

    def _check(self, image, what: str) -> None:
        if not self.checks:
            return
        from kontext_core.policy import safety

        verdict = safety.check_image(image, self.settings.safety_tolerance)
        if verdict.blocked:
            raise ItemRefused(f"blocked by the safety checks: {what} {verdict.reason}")
