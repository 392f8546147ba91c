"""The judge: the truth succeeds, the input and near misses fail, PSNR has its textbook values."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from kontext_core.synthetic import tasks
from kontext_core.synthetic.judge import AGREEMENT_THRESHOLD, edit_mask, judge, psnr
from kontext_core.synthetic.render import COLOURS, Background, Scene, render

SEEDS = list(range(6)) + list(range(tasks.HELD_OUT_SEED, tasks.HELD_OUT_SEED + 6))
OBJECT_KINDS = ("recolor", "add", "move", "text_to_image", "two_reference")  # the edit puts an object somewhere


def _replace_focus(task: tasks.EditTask, **changes) -> Scene | None:
    """The target scene with its edited object changed; None when that makes no valid scene."""
    new = task.focus[-1]
    wrong = dataclasses.replace(new, **changes)
    shapes = tuple(wrong if s == new else s for s in task.target_scene.shapes)
    try:
        return dataclasses.replace(task.target_scene, shapes=shapes)
    except ValueError:
        return None


def test_psnr_known_values():
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[1, 0, 2] = 255  # one of 12 values off by the full range: MSE = 255²/12
    assert psnr(a, b) == pytest.approx(10 * math.log10(12), abs=1e-12)
    assert psnr(a, np.full_like(a, 10)) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    mask = np.array([[True, True], [False, True]])
    assert psnr(a, b, mask) == math.inf
    assert psnr(a, b, ~mask) == pytest.approx(10 * math.log10(3), abs=1e-12)
    # PIL images and arrays agree.
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == psnr(a, b)


def test_psnr_rejects_bad_inputs():
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, np.zeros((3, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="mask"):
        psnr(a, a, np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="no pixels"):
        psnr(a, a, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_truth_succeeds_and_input_fails(kind):
    for seed in SEEDS:
        task = tasks.make_task(seed, kind)
        verdict = judge(task, task.target)
        assert verdict.success and verdict.psnr_target == math.inf, (seed, verdict)
        assert verdict.psnr_unedited in (math.inf, None)
        assert all(v == 1.0 for v in verdict.shape_iou.values())
        unchanged = task.images[0] if task.images else render(Scene(task.target.size, task.target_scene.background))
        verdict = judge(task, unchanged)
        assert not verdict.success, (seed, verdict)
        if kind != "restyle":
            assert min(verdict.details.values()) < 0.1 and verdict.psnr_unedited in (math.inf, None)


@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_object_in_wrong_colour_or_place_fails(kind):
    for seed in SEEDS[:3] + SEEDS[-3:]:
        task = tasks.make_task(seed, kind)
        new = task.focus[-1]
        wrong_colours = [_replace_focus(task, colour=c) for c in COLOURS if c != new.colour]
        wrong_places = [_replace_focus(task, position=p) for p in task.target_scene.free_positions()]
        tried = 0
        for scene in wrong_colours + wrong_places:
            if scene is not None:
                verdict = judge(task, render(scene))
                assert not verdict.success, (seed, scene, verdict)
                tried += 1
        assert tried >= 5


def test_remove_of_the_wrong_object_fails():
    tried = 0
    for seed in range(20):
        task = tasks.make_task(seed, "remove")
        for other in task.target_scene.shapes:  # remove another one and keep the one asked for
            kept = tuple(s for s in task.scenes[0].shapes if s != other)
            assert not judge(task, render(dataclasses.replace(task.target_scene, shapes=kept))).success
            tried += 1
    assert tried >= 10


def test_wrong_background_fails():
    for seed in SEEDS:
        task = tasks.make_task(seed, "background")
        scene = task.target_scene
        avoid = set(scene.background.colours) | {s.colour for s in scene.shapes}
        for colour in (c for c in COLOURS if c not in avoid):
            wrong = dataclasses.replace(scene, background=Background((colour,)))
            assert not judge(task, render(wrong)).success
        if scene.background.texture is not None:  # right colours, wrong pattern
            texture = "checks" if scene.background.texture == "stripes" else "stripes"
            wrong = dataclasses.replace(scene, background=Background(scene.background.colours, texture))
            assert not judge(task, render(wrong)).success


def test_wrong_restyle_fails():
    for seed in SEEDS:
        task = tasks.make_task(seed, "restyle")
        for style in tasks.RESTYLES:
            if style != task.style:
                assert not judge(task, tasks.restyle(task.scenes[0], style)).success, (seed, task.style, style)


def test_small_noise_still_succeeds_and_lowers_psnr():
    rng = np.random.default_rng(0)
    for kind in tasks.KINDS:
        for seed in SEEDS[:3]:
            task = tasks.make_task(seed, kind)
            noisy = np.asarray(task.target).astype(np.float64) + rng.normal(0, 6, (*task.target.size[::-1], 3))
            verdict = judge(task, Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)))
            assert verdict.success, (kind, seed, verdict)
            assert 25 < verdict.psnr_target < 40
            assert verdict.psnr_unedited is None or 25 < verdict.psnr_unedited < 40


def test_preservation_is_measured_outside_the_edit_mask():
    task = tasks.make_task(1, "recolor")
    mask = edit_mask(task)
    ys, xs = np.nonzero(mask)
    far = np.ones_like(mask)
    far[max(ys.min() - 4, 0) : ys.max() + 5, max(xs.min() - 4, 0) : xs.max() + 5] = False
    damaged = np.asarray(task.target).copy()
    damaged[far] = 255 - damaged[far]
    verdict = judge(task, Image.fromarray(damaged))
    assert verdict.success  # the edit itself is right, only the rest of the image is ruined
    assert verdict.psnr_unedited < 10
    partly = np.asarray(task.target).copy()
    partly[mask] = 0
    assert judge(task, Image.fromarray(partly)).psnr_unedited == math.inf
    assert all(v < AGREEMENT_THRESHOLD for v in judge(task, Image.fromarray(partly)).details.values())


def test_judge_rejects_wrong_output():
    task = tasks.make_task(0, "recolor")
    w, h = task.target.size
    with pytest.raises(ValueError, match="target's size"):
        judge(task, task.target.resize((w + 16, h)))
    with pytest.raises(TypeError, match="PIL image"):
        judge(task, np.asarray(task.target))
