"""Synthetic edit tasks with known answers: a seeded scene, an instruction, and the rendered truth.

`make_task(seed)` is deterministic (same seed, same pixels and text, on every platform: all draws go through
`random.Random.random()`, whose sequence Python guarantees). Seeds from `HELD_OUT_SEED` up are held out:
for them the edited object is, half of the time, one of `HELD_OUT_COMBINATIONS` — (colour, shape, position)
triples that no task below `HELD_OUT_SEED` contains anywhere — so a benchmark on them measures generalisation
to combinations never seen in training.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kontext_core.synthetic.render import (
    COLOURS,
    IMAGE_SIZES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Background,
    Scene,
    Shape,
    background_phrase,
    describe,
    location_phrase,
    render,
)

KINDS: tuple[str, ...] = (
    "recolor",
    "remove",
    "add",
    "move",
    "background",
    "restyle",
    "text_to_image",
    "two_reference",
)
RESTYLES: tuple[str, ...] = ("grayscale", "invert", "pixelate", "outline")
HELD_OUT_SEED = 1_000_000
# One triple per colour; every colour, shape and position still appears in training in other combinations.
HELD_OUT_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "star", "top right"),
        ("orange", "cross", "left"),
        ("yellow", "square", "top left"),
        ("green", "triangle", "center"),
        ("cyan", "star", "bottom"),
        ("blue", "circle", "bottom left"),
        ("purple", "diamond", "bottom right"),
        ("pink", "triangle", "right"),
        ("white", "circle", "top"),
        ("black", "square", "center"),
    }
)
_HELD_OUT_SHARE = 0.5  # of held-out tasks with an edited object, how many edit a held-out combination
_PIXELATE_BLOCK = 8
# A restyle must change at least this share of pixels (grayscale of a black-and-white scene would not);
# a single small outlined shape changes about 1.5 %.
_MIN_RESTYLE_CHANGE = 0.01

# The instruction wordings of each kind (and each restyle), drawn from by the task's seed: data, kept apart
_TEMPLATES: dict[str, tuple[str, ...]] = {
    kind: tuple(wordings)
    for kind, wordings in json.loads(Path(__file__).with_name("instructions.json").read_text()).items()
}


@dataclass(eq=False)
class EditTask:
    """One edit with its truth; `scenes`, `target_scene` and `focus` let the judge (`kontext_core.synthetic.judge`)
    know exactly what changed."""

    images: list[Image.Image]  # the references; empty for text-to-image
    instruction: str
    target: Image.Image  # the rendered truth
    kind: str
    seed: int
    scenes: tuple[Scene, ...]  # the scene of each reference image
    target_scene: Scene  # for restyle, the unstyled scene (the style is applied to its rendering)
    focus: tuple[Shape, ...]  # the shapes the edit is about: old and new versions, in image 1's frame
    style: str | None = None  # the restyle applied, for kind "restyle"
    held_out: bool = False  # the edited object is a held-out combination


class _Rng:
    """Draws built on `random()` only, the one method whose sequence Python keeps across versions."""

    def __init__(self, key: str) -> None:
        self._random = random.Random(key)

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def pick(self, options):
        options = tuple(options)
        if not options:
            raise RuntimeError("internal: nothing left to choose from")
        return options[self.below(len(options))]

    def chance(self, p: float) -> bool:
        return self._random.random() < p


def _triple(shape: Shape) -> tuple[str, str, str]:
    return shape.colour, shape.kind, shape.position


def _background(rng: _Rng, avoid: set[str]) -> Background:
    colours = [c for c in COLOURS if c not in avoid]
    first = rng.pick(colours)
    if rng.chance(0.6):
        return Background((first,))
    return Background((first, rng.pick(c for c in colours if c != first)), rng.pick(TEXTURES))


def _shape(rng: _Rng, background: Background, others: list[Shape]) -> Shape:
    """A shape in a free cell, visible on the background, unambiguous by name, never a held-out combination."""
    taken_cells = {s.position for s in others}
    taken_names = {s.name for s in others}
    options = [
        (colour, kind, position)
        for colour in COLOURS
        if colour not in background.colours
        for kind in SHAPES
        if f"{colour} {kind}" not in taken_names
        for position in POSITIONS
        if position not in taken_cells and (colour, kind, position) not in HELD_OUT_COMBINATIONS
    ]
    colour, kind, position = rng.pick(options)
    return Shape(kind, colour, position, rng.pick(SIZES))


def _others(rng: _Rng, background: Background, fixed: list[Shape], count: int) -> list[Shape]:
    """`count` more shapes that share no cell or name with the `fixed` ones."""
    shapes: list[Shape] = []
    for _ in range(count):
        shapes.append(_shape(rng, background, fixed + shapes))
    return shapes


def _focus(rng: _Rng, seed: int) -> tuple[Shape | None, bool]:
    """The edited object when it must be a held-out combination (only for held-out seeds), else None."""
    if seed < HELD_OUT_SEED or not rng.chance(_HELD_OUT_SHARE):
        return None, False
    colour, kind, position = rng.pick(sorted(HELD_OUT_COMBINATIONS))
    return Shape(kind, colour, position, rng.pick(SIZES)), True


def _free_focus(rng: _Rng) -> Shape:
    """An edited object drawn like any other shape, before the scene around it exists."""
    options = [(c, k, p) for c in COLOURS for k in SHAPES for p in POSITIONS if (c, k, p) not in HELD_OUT_COMBINATIONS]
    colour, kind, position = rng.pick(options)
    return Shape(kind, colour, position, rng.pick(SIZES))


def _say(rng: _Rng, family: str, **words: str) -> str:
    return rng.pick(_TEMPLATES[family]).format(**words)


def restyle(scene: Scene, style: str) -> Image.Image:
    """The rendered scene in a style: outlined shapes, or a grayscale / inverted / pixelated image."""
    if style == "outline":
        return render(dataclasses.replace(scene, outline=True))
    image = render(scene)
    if style == "grayscale":
        return image.convert("L").convert("RGB")
    if style == "invert":
        return ImageOps.invert(image)
    if style == "pixelate":
        w, h = image.size
        small = image.resize((w // _PIXELATE_BLOCK, h // _PIXELATE_BLOCK), Image.BOX)
        return small.resize((w, h), Image.NEAREST)
    raise ValueError(f"style {style!r} is not one of {RESTYLES}")


def _task(
    seed: int,
    kind: str,
    instruction: str,
    scenes: list[Scene],
    target_scene: Scene,
    focus: tuple[Shape, ...],
    *,
    target: Image.Image | None = None,
    style: str | None = None,
    held_out: bool = False,
) -> EditTask:
    return EditTask(
        images=[render(s) for s in scenes],
        instruction=instruction,
        target=render(target_scene) if target is None else target,
        kind=kind,
        seed=seed,
        scenes=tuple(scenes),
        target_scene=target_scene,
        focus=tuple(focus),
        style=style,
        held_out=held_out,
    )


def _recolor(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    new, held_out = _focus(rng, seed)
    new = new or _free_focus(rng)
    old_colours = [c for c in COLOURS if c != new.colour and (c, new.kind, new.position) not in HELD_OUT_COMBINATIONS]
    old = dataclasses.replace(new, colour=rng.pick(old_colours))
    bg = _background(rng, {old.colour, new.colour})
    others = _others(rng, bg, [old, new], rng.below(3))
    instruction = _say(rng, "recolor", name=old.name, colour=new.colour)
    before, after = Scene(size, bg, (*others, old)), Scene(size, bg, (*others, new))
    return _task(seed, "recolor", instruction, [before], after, (old, new), held_out=held_out)


def _remove(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    gone, held_out = _focus(rng, seed)
    gone = gone or _free_focus(rng)
    bg = _background(rng, {gone.colour})
    others = _others(rng, bg, [gone], rng.below(3))
    instruction = _say(rng, "remove", name=gone.name)
    before, after = Scene(size, bg, (*others, gone)), Scene(size, bg, tuple(others))
    return _task(seed, "remove", instruction, [before], after, (gone,), held_out=held_out)


def _add(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    new, held_out = _focus(rng, seed)
    new = new or _free_focus(rng)
    bg = _background(rng, {new.colour})
    others = _others(rng, bg, [new], rng.below(3))
    instruction = _say(rng, "add", size=new.size, name=new.name, location=location_phrase(new.position))
    before, after = Scene(size, bg, tuple(others)), Scene(size, bg, (*others, new))
    return _task(seed, "add", instruction, [before], after, (new,), held_out=held_out)


def _move(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    new, held_out = _focus(rng, seed)
    new = new or _free_focus(rng)
    starts = [p for p in POSITIONS if p != new.position and (new.colour, new.kind, p) not in HELD_OUT_COMBINATIONS]
    old = dataclasses.replace(new, position=rng.pick(starts))
    bg = _background(rng, {new.colour})
    others = _others(rng, bg, [old, new], rng.below(3))
    instruction = _say(rng, "move", name=old.name, position=new.position, location=location_phrase(new.position))
    before, after = Scene(size, bg, (*others, old)), Scene(size, bg, (*others, new))
    return _task(seed, "move", instruction, [before], after, (old, new), held_out=held_out)


def _change_background(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    old_bg = _background(rng, set())
    shapes = _others(rng, old_bg, [], 1 + rng.below(3))
    new_bg = _background(rng, set(old_bg.colours) | {s.colour for s in shapes})
    instruction = _say(rng, "background", background=background_phrase(new_bg))
    shapes = tuple(shapes)
    return _task(seed, "background", instruction, [Scene(size, old_bg, shapes)], Scene(size, new_bg, shapes), ())


def _restyle(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    style = rng.pick(RESTYLES)
    while True:  # redraw the rare scenes the style leaves (almost) unchanged
        bg = _background(rng, set())
        scene = Scene(size, bg, tuple(_others(rng, bg, [], 1 + rng.below(3))))
        target = restyle(scene, style)
        changed = np.any(np.asarray(target) != np.asarray(render(scene)), axis=-1).mean()
        if changed >= _MIN_RESTYLE_CHANGE:
            break
    instruction = _say(rng, style)
    return _task(seed, "restyle", instruction, [scene], scene, (), target=target, style=style)


def _text_to_image(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    first, held_out = _focus(rng, seed)
    first = first or _free_focus(rng)
    bg = _background(rng, {first.colour})
    scene = Scene(size, bg, (first, *_others(rng, bg, [first], rng.below(3))))
    instruction = _say(rng, "text_to_image", description=describe(scene))
    return _task(seed, "text_to_image", instruction, [], scene, scene.shapes, held_out=held_out)


def _two_reference(rng: _Rng, seed: int, size: tuple[int, int]) -> EditTask:
    placed, held_out = _focus(rng, seed)
    placed = placed or _free_focus(rng)
    bg = _background(rng, {placed.colour})
    base = Scene(size, bg, tuple(_others(rng, bg, [placed], rng.below(3))))
    # The object's place in image 2 is never the place asked for, so copying image 2's layout is wrong.
    source_cells = [
        p for p in POSITIONS if p != placed.position and (placed.colour, placed.kind, p) not in HELD_OUT_COMBINATIONS
    ]
    original = dataclasses.replace(placed, position=rng.pick(source_cells))
    donor_bg = _background(rng, {original.colour})
    donor = Scene(rng.pick(IMAGE_SIZES), donor_bg, (original, *_others(rng, donor_bg, [original], rng.below(2))))
    instruction = _say(rng, "two_reference", name=placed.name, location=location_phrase(placed.position))
    target = Scene(size, bg, (*base.shapes, placed))
    return _task(seed, "two_reference", instruction, [base, donor], target, (placed,), held_out=held_out)


_MAKERS = {
    "recolor": _recolor,
    "remove": _remove,
    "add": _add,
    "move": _move,
    "background": _change_background,
    "restyle": _restyle,
    "text_to_image": _text_to_image,
    "two_reference": _two_reference,
}


def make_task(seed: int, kind: str | None = None) -> EditTask:
    """The task for `seed`; with `kind=None` the kind cycles with the seed (`KINDS[seed % len(KINDS)]`),
    so `make_task(s)` equals `make_task(s, make_task(s).kind)`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if kind is None:
        kind = KINDS[seed % len(KINDS)]
    if kind not in _MAKERS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    rng = _Rng(f"kontext-task:{kind}:{seed}")
    return _MAKERS[kind](rng, seed, rng.pick(IMAGE_SIZES))


def words(text: str) -> list[str]:
    """Lower-case words and single punctuation marks, the units `vocabulary()` lists."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def vocabulary() -> list[str]:
    """Every word an instruction or description can contain, sorted."""
    found = set(COLOURS) | set(SHAPES) | set(SIZES) | set(TEXTURES)
    for position in POSITIONS:
        found.update(words(location_phrase(position)))
        found.update(words(position))
    for templates in _TEMPLATES.values():
        for template in templates:
            found.update(words(re.sub(r"\{\w+\}", " ", template)))
    # describe()'s joining words: one scene with several shapes on each kind of background, one empty.
    shapes = (Shape("circle", "red", "top"), Shape("star", "blue", "left"), Shape("cross", "green", "right"))
    for background in (Background(("white",)), *(Background(("white", "black"), t) for t in TEXTURES)):
        for scene in (Scene((64, 64), background, shapes), Scene((64, 64), background)):
            found.update(words(describe(scene)))
            found.update(words(background_phrase(background)))
    return sorted(found)
