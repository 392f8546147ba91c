"""Where a command's images go, written whole with their provenance, and its progress line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kontext_core.files import written_whole


def progress_bar(total_label: str):
    start = time.perf_counter()

    def report(info) -> None:
        width = 30
        done = int(width * info.step / info.total)
        elapsed = time.perf_counter() - start
        sys.stderr.write(
            f"\r{total_label} [{'#' * done}{'.' * (width - done)}] {info.step}/{info.total} "
            f"{elapsed / info.step:.2f}s/step"
        )
        if info.step == info.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def output_paths(out: str, count: int) -> list[Path]:
    """`out` for one image; `_1`, `_2` … appended to its name for several."""
    target = Path(out)
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{i + 1}{target.suffix}") for i in range(count)]


def save_image(image, path: str | Path, made_by: dict | None = None) -> Path:
    """A PNG at `path`, written whole. A generated image (`made_by`: `model`, `instruction`, `parameters`,
    `inputs` for `provenance.save_png`) carries the AI disclosure, signed when KONTEXT_C2PA_* is set; inputs and
    truths are plain."""
    from kontext_core.policy import provenance

    path = Path(path)
    try:
        if made_by is not None:
            return provenance.save_png(image, path, signing=provenance.SigningConfig.from_env(), **made_by)
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            image.save(partial, format="PNG")
    except OSError as e:  # named by the path asked for, not by the temporary file the error may name
        raise ValueError(f"{path}: cannot be written ({e.strerror or e})") from e
    return path


def refuse_bad_out(out: str, *, folder: bool = False) -> None:
    """Before any work: `--out` must be a PNG name (or, for `folder`, a folder) whose place can hold it."""
    path = Path(out)
    if not folder and path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the images are written as PNG; give a name ending in .png")
    try:
        if not folder and path.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name in it, such as {path / 'edited.png'}")
        if folder and path.exists() and not path.is_dir():
            raise ValueError(f"--out {out} is a file; the demo writes its images into a folder")
        for above in (path.parent, *path.parent.parents):
            if above.is_symlink() and not above.exists():
                raise ValueError(f"--out {out}: {above} is a link to nothing")
            if above.exists():
                if not above.is_dir():
                    raise ValueError(f"--out {out}: {above} is a file, not a folder")
                break
    except OSError as e:  # e.g. a folder on the way that may not be looked into
        raise ValueError(f"--out {out}: cannot be checked ({e.strerror or e})") from None


def made_by(model: str, instruction: str, inputs: list, *, steps: int, seed: int, guidance: float) -> dict:
    """What `save_image` records about a generated image (`provenance.save_png`'s keywords)."""
    return {
        "model": model,
        "instruction": instruction,
        "inputs": inputs,
        "parameters": f"seed {seed}, steps {steps}, guidance {guidance}",
    }
