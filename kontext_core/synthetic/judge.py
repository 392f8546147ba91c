"""Judging an edit against the rendered truth of a synthetic task (`kontext_core.synthetic.tasks`).

An edit succeeds when the pixels it had to change now name the right palette colours: each pixel is named by
its nearest palette colour, and around every edited object each group of pixels that shares its (input
colour, true colour) pair must be named like the truth in at least `AGREEMENT_THRESHOLD` of its pixels.
So a recolour must show the new colour on the object and keep the background around it, a move must show
the object at the new place and background at the old one, and copying the input scores 0 on the pixels
that had to change. Pixels blended on an antialiased edge of the input or the truth are not counted, and
neither are groups under `MIN_PART_PIXELS`. Restyles change the whole image rather than objects (grey or
inverted colours, outlines, blocks), so they are judged by PSNR to the truth instead. Preservation (PSNR
outside `edit_mask`) is reported, not part of success.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kontext_core.synthetic.tasks import EditTask
from kontext_core.synthetic.render import PALETTE, Scene, Shape, coverage, render

AGREEMENT_THRESHOLD = 0.8
MIN_PART_PIXELS = 4
RESTYLE_MIN_PSNR = 20.0  # dB; and the output must be nearer the truth than the input
_NEIGHBOURHOOD = 2  # pixels of surround judged beyond an object's bounding box: its shape must be right
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    success: bool
    psnr_target: float  # dB over the whole image; inf when identical
    psnr_unedited: float | None  # dB outside the edit mask; None when the edit may change every pixel
    details: dict[str, float] = field(default_factory=dict)  # per judged region: worst group agreement, or PSNR
    # Per object the edit puts in the image, by position: intersection over union of the pixels named its colour
    # in the output and in the truth. A measure of shape fidelity, not part of success (a square for a circle
    # still names the right colour at the right place).
    shape_iou: dict[str, float] = field(default_factory=dict)


def _pixels(image, what: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim not in (2, 3) or array.dtype != np.uint8:
        raise ValueError(
            f"{what} must be a PIL image or a uint8 array [H, W] or [H, W, C], got {array.dtype} {array.shape}"
        )
    return array


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between two 8-bit images (PIL or uint8 arrays), over the pixels where `mask` is True;
    `math.inf` when they are equal there."""
    x, y = _pixels(a, "psnr input a").astype(np.float64), _pixels(b, "psnr input b").astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of one shape, got {x.shape} and {y.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != x.shape[:2]:
            raise ValueError(f"psnr mask must be a bool array of shape {x.shape[:2]}, got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise ValueError("psnr mask selects no pixels")
        x, y = x[mask], y[mask]
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _palette_names(image: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of every pixel, [H, W]."""
    # |x - p|² less the |x|² common to all p; exact in float32 for 8-bit values.
    distances = (_PALETTE_RGB**2).sum(-1) - 2 * image.astype(np.float32) @ _PALETTE_RGB.T
    return distances.argmin(-1)


def _pure(image: np.ndarray, names: np.ndarray) -> np.ndarray:
    """Pixels that are exactly their palette colour: not blended on an antialiased edge."""
    return np.all(image == _PALETTE_RGB.astype(np.uint8)[names], axis=-1)


def _neighbourhood(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    ys, xs = np.nonzero(coverage(shape, size))
    region = np.zeros((size[1], size[0]), dtype=bool)
    m = _NEIGHBOURHOOD
    region[max(ys.min() - m, 0) : ys.max() + m + 1, max(xs.min() - m, 0) : xs.max() + m + 1] = True
    return region


def edit_mask(task: EditTask) -> np.ndarray:
    """The pixels the edit may change, bool [H, W] in the target's frame: the edited objects' footprints
    (old and new), the background around the objects, or every pixel for restyle and text-to-image."""
    size = task.target.size
    if task.kind in ("restyle", "text_to_image"):
        return np.ones((size[1], size[0]), dtype=bool)
    if task.kind == "background":
        covered = np.zeros((size[1], size[0]), dtype=bool)
        for shape in task.target_scene.shapes:
            covered |= coverage(shape, size) >= 1.0
        return ~covered
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for shape in task.focus:
        mask |= coverage(shape, size) > 0
    return mask


def _regions(task: EditTask) -> dict[str, np.ndarray]:
    """Named regions to judge: around each edited place, or the whole background."""
    w, h = task.target.size
    if task.kind == "background":
        return {"background": np.ones((h, w), dtype=bool)}
    regions: dict[str, np.ndarray] = {}
    for shape in task.focus:
        regions[shape.position] = regions.get(shape.position, np.zeros((h, w), dtype=bool)) | _neighbourhood(
            shape, (w, h)
        )
    if task.kind == "text_to_image":
        regions["background"] = ~np.logical_or.reduce(list(regions.values()))
    return regions


def _agreement(output: np.ndarray, truth: np.ndarray, source: np.ndarray, counted: np.ndarray) -> tuple[float, int]:
    """The worst share of correctly named pixels over the groups of one (input name, true name) pair,
    and the size of the largest group whose name changes."""
    key = truth.astype(np.int64) + len(PALETTE) * source
    correct = output == truth
    worst, largest_change = 1.0, 0
    for value in np.unique(key[counted]):
        part = counted & (key == value)
        n = int(part.sum())
        if n >= MIN_PART_PIXELS:
            worst = min(worst, float(correct[part].mean()))
        if value % len(PALETTE) != value // len(PALETTE):
            largest_change = max(largest_change, n)
    return worst, largest_change


def judge(task: EditTask, output: Image.Image) -> Judgement:
    """Whether `output` carries out `task`, from the task's rendered truth (see the module docstring)."""
    if not isinstance(output, Image.Image):
        raise TypeError(f"output must be a PIL image, got {type(output).__name__}")
    if output.size != task.target.size:
        raise ValueError(
            f"output is {output.size[0]}×{output.size[1]} but the task's target is "
            f"{task.target.size[0]}×{task.target.size[1]}; generate at the target's size"
        )
    out = _pixels(output, "output")
    target = _pixels(task.target, "task target")
    mask = edit_mask(task)
    psnr_unedited = None if mask.all() else psnr(out, target, ~mask)
    psnr_target = psnr(out, target)

    if task.kind == "restyle":
        psnr_input = psnr(out, task.images[0])
        success = psnr_target >= RESTYLE_MIN_PSNR and psnr_target > psnr_input
        return Judgement(success, psnr_target, psnr_unedited, {"psnr_to_input": psnr_input})

    truth = _palette_names(target)
    # Text-to-image is judged as an edit of the bare background, so objects and background form separate groups.
    before = task.images[0] if task.images else render(Scene(task.target.size, task.target_scene.background))
    before = _pixels(before, "task input")
    source = _palette_names(before)
    named = _palette_names(out)
    judged = _pure(target, truth) & _pure(before, source)
    details = {}
    for name, region in _regions(task).items():
        details[name], largest_change = _agreement(named, truth, source, region & judged)
        # Every edited place must hold a judged group that changes, or copying the input would pass.
        if largest_change < MIN_PART_PIXELS and (name != "background" or task.kind == "background"):
            raise ValueError(f"task {task.kind} seed {task.seed}: too few changing pixels to judge at {name!r}")
    success = all(score >= AGREEMENT_THRESHOLD for score in details.values())
    shape_iou = {}
    for shape in task.focus:
        if shape in task.target_scene.shapes:
            colour = list(PALETTE).index(shape.colour)
            region = _neighbourhood(shape, task.target.size) & judged
            ours, true = region & (named == colour), region & (truth == colour)
            shape_iou[shape.position] = float((ours & true).sum() / (ours | true).sum())
    return Judgement(success, psnr_target, psnr_unedited, details, shape_iou)
