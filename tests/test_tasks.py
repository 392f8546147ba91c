"""The synthetic edit tasks: deterministic, exact truths, tight edits, honest held-out split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kontext_core.synthetic import tasks
from kontext_core.synthetic.judge import edit_mask
from kontext_core.synthetic.render import IMAGE_SIZES, PALETTE, POSITIONS, Background, Scene, Shape, shape_geometry
from kontext_core.synthetic.render import background_phrase, describe, location_phrase, render

SEEDS = list(range(12)) + list(range(tasks.HELD_OUT_SEED, tasks.HELD_OUT_SEED + 12))
EDIT_KINDS = ("recolor", "remove", "add", "move", "background", "two_reference")


def _px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _all_shapes(task: tasks.EditTask) -> list[Shape]:
    return [*task.focus, *task.target_scene.shapes, *(s for scene in task.scenes for s in scene.shapes)]


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_same_seed_gives_identical_task(kind):
    for seed in (3, tasks.HELD_OUT_SEED + 5):
        a, b = tasks.make_task(seed, kind), tasks.make_task(seed, kind)
        assert a.instruction == b.instruction and a.kind == b.kind == kind
        assert a.scenes == b.scenes and a.target_scene == b.target_scene and a.focus == b.focus
        assert np.array_equal(_px(a.target), _px(b.target))
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert np.array_equal(_px(x), _px(y))


def test_kind_follows_seed_when_not_given():
    for seed in range(16):
        task = tasks.make_task(seed)
        assert task.kind == tasks.KINDS[seed % len(tasks.KINDS)]
        assert task.instruction == tasks.make_task(seed, task.kind).instruction


def test_seeds_give_varied_tasks():
    made = [tasks.make_task(seed) for seed in range(160)]
    assert len({t.instruction for t in made}) > 140
    assert {t.target.size for t in made} == set(IMAGE_SIZES)
    assert {t.kind for t in made} == set(tasks.KINDS)
    assert {t.style for t in made if t.kind == "restyle"} == set(tasks.RESTYLES)
    assert {t.target_scene.background.texture for t in made} == {None, "stripes", "checks"}


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_target_differs_from_input_exactly_inside_edit_mask(kind):
    for seed in SEEDS:
        task = tasks.make_task(seed, kind)
        source, target = _px(task.images[0]), _px(task.target)
        mask = edit_mask(task)
        assert mask.shape == source.shape[:2]
        changed = np.any(source != target, axis=-1)
        assert not changed[~mask].any(), f"{kind} seed {seed}: pixels outside the edit mask changed"
        assert changed[mask].mean() > 0.95, f"{kind} seed {seed}: the edit mask is loose"


def test_restyles_are_what_they_say():
    found = set()
    for seed in range(200):
        task = tasks.make_task(seed, "restyle")
        source, target = _px(task.images[0]), _px(task.target)
        if task.style == "grayscale":
            assert np.array_equal(target[..., 0], target[..., 1]) and np.array_equal(target[..., 1], target[..., 2])
            assert not np.array_equal(source[..., 0], source[..., 1])
        elif task.style == "invert":
            assert np.array_equal(target, 255 - source)
        elif task.style == "pixelate":
            h, w, _ = target.shape
            blocks = target.reshape(h // 8, 8, w // 8, 8, 3)
            assert (blocks == blocks[:, :1, :, :1]).all()
            assert not np.array_equal(target, source)
        else:  # outline: the background shows through the middle of each shape, its colour stays on the rim
            scene = task.target_scene
            bare = _px(render(dataclasses.replace(scene, shapes=())))
            for shape in scene.shapes:
                cx, cy, _ = shape_geometry(shape, scene.size)
                if shape.kind in ("circle", "square", "diamond"):
                    assert tuple(target[int(cy), int(cx)]) == tuple(bare[int(cy), int(cx)])
                assert (target == PALETTE[shape.colour]).all(-1).sum() > 10
        found.add(task.style)
        if found == set(tasks.RESTYLES):
            break
    assert found == set(tasks.RESTYLES)


def test_shapes_sit_in_their_named_cell():
    for seed in range(40):
        task = tasks.make_task(seed, "text_to_image")
        w, h = task.target.size
        pixels = _px(task.target)
        for shape in task.target_scene.shapes:
            cx, cy, _ = shape_geometry(shape, (w, h))
            row, col = divmod(POSITIONS.index(shape.position), 3)
            assert col * w / 3 < cx < (col + 1) * w / 3 and row * h / 3 < cy < (row + 1) * h / 3
            assert tuple(pixels[int(cy), int(cx)]) == PALETTE[shape.colour]
    # "top left" is the top-left corner of the image, not a transposed one, on a non-square image.
    scene = Scene((96, 64), Background(("white",)), (Shape("square", "red", "top left"),))
    pixels = _px(render(scene))
    assert tuple(pixels[10, 16]) == PALETTE["red"] and tuple(pixels[10, 80]) == PALETTE["white"]
    assert tuple(pixels[53, 16]) == PALETTE["white"]


def test_instructions_name_the_edit():
    for seed in SEEDS:
        t = tasks.make_task(seed, "recolor")
        old, new = t.focus
        assert old.name in t.instruction and t.instruction.rstrip(".").endswith(new.colour)
        assert (old.kind, old.position) == (new.kind, new.position) and old.colour != new.colour

        t = tasks.make_task(seed, "remove")
        (gone,) = t.focus
        assert gone.name in t.instruction and gone not in t.target_scene.shapes and gone in t.scenes[0].shapes

        t = tasks.make_task(seed, "add")
        (new,) = t.focus
        assert f"{new.size} {new.name} {location_phrase(new.position)}" in t.instruction
        assert new in t.target_scene.shapes and new not in t.scenes[0].shapes

        t = tasks.make_task(seed, "move")
        old, new = t.focus
        assert old.name in t.instruction and new.position in t.instruction and old.position != new.position
        assert old in t.scenes[0].shapes and new in t.target_scene.shapes

        t = tasks.make_task(seed, "background")
        assert background_phrase(t.target_scene.background) in t.instruction
        assert set(t.target_scene.background.colours).isdisjoint(t.scenes[0].background.colours)

        t = tasks.make_task(seed, "text_to_image")
        assert t.images == [] and describe(t.target_scene) in t.instruction

        t = tasks.make_task(seed, "two_reference")
        (placed,) = t.focus
        assert f"{placed.name} from" in t.instruction or f"{placed.name} of" in t.instruction
        assert location_phrase(placed.position) in t.instruction
        donor = t.scenes[1].shape_named(placed.name)
        assert donor.position != placed.position and donor.size == placed.size
        assert placed.name not in {s.name for s in t.scenes[0].shapes}


def test_describe_is_exact():
    scene = Scene(
        (64, 96),
        Background(("yellow", "black"), "stripes"),
        (Shape("star", "red", "bottom right", "small"), Shape("circle", "blue", "top left")),
    )
    assert describe(scene) == (
        "a large blue circle at the top left and a small red star at the bottom right "
        "on a background of yellow and black stripes"
    )


def test_held_out_combinations_never_in_training_and_present_when_held_out():
    for seed in range(2000):
        task = tasks.make_task(seed)
        assert not task.held_out
        for shape in _all_shapes(task):
            assert (shape.colour, shape.kind, shape.position) not in tasks.HELD_OUT_COMBINATIONS, seed
    seen = set()
    held = 0
    for seed in range(tasks.HELD_OUT_SEED, tasks.HELD_OUT_SEED + 400):
        task = tasks.make_task(seed)
        triples = {(s.colour, s.kind, s.position) for s in task.focus} & tasks.HELD_OUT_COMBINATIONS
        assert task.held_out == bool(triples)
        held += task.held_out
        seen |= triples
    # Six of the eight kinds edit an object, half of those pick a held-out one: about 37 %.
    assert 0.25 < held / 400 < 0.5
    assert seen == tasks.HELD_OUT_COMBINATIONS


def test_vocabulary_covers_every_instruction():
    vocabulary = set(tasks.vocabulary())
    assert {"red", "star", "top", "left", "center", "stripes", "checks", "small", "large", "."} <= vocabulary
    for seed in list(range(400)) + list(range(tasks.HELD_OUT_SEED, tasks.HELD_OUT_SEED + 100)):
        words = tasks.words(tasks.make_task(seed).instruction)
        assert set(words) <= vocabulary, set(words) - vocabulary


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="seed"):
        tasks.make_task(-1)
    with pytest.raises(ValueError, match="seed"):
        tasks.make_task(2.0)
    with pytest.raises(ValueError, match="kind 'rotate'"):
        tasks.make_task(0, "rotate")
    with pytest.raises(ValueError, match="shape kind 'hexagon'"):
        Shape("hexagon", "red", "center")
    with pytest.raises(ValueError, match="shape position 'middle'"):
        Shape("circle", "red", "middle")
    with pytest.raises(ValueError, match="scene size"):
        Scene((50, 64), Background(("white",)))
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((64, 64), Background(("white",)), (Shape("circle", "red", "top"), Shape("star", "blue", "top")))
    with pytest.raises(ValueError, match="vanish"):
        Scene((64, 64), Background(("red", "white"), "checks"), (Shape("circle", "red", "top"),))
    with pytest.raises(ValueError, match="style 'sepia'"):
        tasks.restyle(Scene((64, 64), Background(("white",))), "sepia")


def test_scenes_are_immutable_values():
    task = tasks.make_task(5, "move")
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.focus[0].colour = "red"
