"""Scenes of coloured shapes: the exact scene model, its deterministic rendering and its exact description.

A scene is small (64×64, 96×64 or 64×96), has a plain or textured background and at most one shape per cell
of a 3×3 grid, so every edit has an exactly known result: render the edited scene.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Fixed palette, far apart in RGB so the judge can name every pixel's colour by its nearest entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 160, 60),
    "cyan": (60, 210, 220),
    "blue": (40, 70, 220),
    "purple": (140, 60, 190),
    "pink": (245, 150, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SIZES: dict[str, float] = {"small": 0.65, "large": 0.85}  # radius as a fraction of half the smaller cell side
TEXTURES: tuple[str, ...] = ("stripes", "checks")
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96))

_SUPERSAMPLE = 4  # shapes are drawn 4× larger and box-filtered down: deterministic antialiasing
_TEXTURE_CELL = 8  # pixels per stripe / check, a divisor of every image side so textures tile exactly
_OUTLINE_WIDTH = 2  # pixels


@dataclass(frozen=True)
class Background:
    """A plain colour (`texture=None`, one colour) or a two-colour texture."""

    colours: tuple[str, ...]
    texture: str | None = None

    def __post_init__(self) -> None:
        for c in self.colours:
            if c not in PALETTE:
                raise ValueError(f"background colour {c!r} is not in the palette {COLOURS}")
        if self.texture is None and len(self.colours) != 1:
            raise ValueError(f"a plain background takes one colour, got {self.colours}")
        if self.texture is not None:
            if self.texture not in TEXTURES:
                raise ValueError(f"background texture {self.texture!r} is not one of {TEXTURES}")
            if len(self.colours) != 2 or self.colours[0] == self.colours[1]:
                raise ValueError(f"a textured background takes two different colours, got {self.colours}")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    size: str = "large"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.kind, SHAPES, "shape kind"),
            (self.colour, COLOURS, "shape colour"),
            (self.position, POSITIONS, "shape position"),
            (self.size, tuple(SIZES), "shape size"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} {value!r} is not one of {allowed}")

    @property
    def name(self) -> str:
        """How instructions refer to the shape; unique within a scene."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # (width, height)
    background: Background
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    outline: bool = False  # shapes drawn as outlines instead of filled (the "outline" restyle)

    def __post_init__(self) -> None:
        if self.size not in IMAGE_SIZES:
            raise ValueError(f"scene size {self.size} is not one of {IMAGE_SIZES}")
        cells = [s.position for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share a grid cell: {cells}")
        names = [s.name for s in self.shapes]
        if len(set(names)) != len(names):
            raise ValueError(f"two shapes share a name, so instructions could not tell them apart: {names}")
        for s in self.shapes:
            if s.colour in self.background.colours:
                raise ValueError(f"the {s.name} would vanish into the {self.background.colours} background")

    def shape_named(self, name: str) -> Shape:
        for s in self.shapes:
            if s.name == name:
                return s
        raise KeyError(f"no {name!r} in the scene (shapes: {[s.name for s in self.shapes]})")

    def free_positions(self) -> tuple[str, ...]:
        taken = {s.position for s in self.shapes}
        return tuple(p for p in POSITIONS if p not in taken)


def shape_geometry(shape: Shape, image_size: tuple[int, int]) -> tuple[float, float, float]:
    """Centre (x, y) and radius in pixels: the centre of the shape's grid cell."""
    w, h = image_size
    row, col = divmod(POSITIONS.index(shape.position), 3)
    cell_w, cell_h = w / 3, h / 3
    radius = SIZES[shape.size] * min(cell_w, cell_h) / 2
    return (col + 0.5) * cell_w, (row + 0.5) * cell_h, radius


def _outline_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        a = 0.85 * r  # a square of half-side r would look much heavier than the circle
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if kind == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + q * math.sin(k * math.pi / 5), cy - q * math.cos(k * math.pi / 5)) for k, q in enumerate(radii)]
    if kind == "cross":
        a, b = 0.35 * r, r
        return [
            (cx - a, cy - b),
            (cx + a, cy - b),
            (cx + a, cy - a),
            (cx + b, cy - a),
            (cx + b, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + b),
            (cx - a, cy + b),
            (cx - a, cy + a),
            (cx - b, cy + a),
            (cx - b, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"shape kind {kind!r} is not one of {SHAPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, image_size: tuple[int, int], fill, outline: bool) -> None:
    s = _SUPERSAMPLE
    cx, cy, r = (v * s for v in shape_geometry(shape, image_size))
    style = {"outline": fill, "width": _OUTLINE_WIDTH * s} if outline else {"fill": fill}
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    else:
        draw.polygon(_outline_points(shape.kind, cx, cy, r), **style)


@functools.lru_cache(maxsize=256)
def _background_array(background: Background, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    colours = np.array([PALETTE[c] for c in background.colours], dtype=np.uint8)
    ys, xs = np.mgrid[0:h, 0:w] // _TEXTURE_CELL
    if background.texture is None:
        index = np.zeros((h, w), dtype=np.intp)
    elif background.texture == "stripes":
        index = ys % 2
    else:
        index = (ys + xs) % 2
    pixels = colours[index]
    pixels.setflags(write=False)  # shared through the cache
    return pixels


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; identical pixels for identical scenes."""
    w, h = scene.size
    s = _SUPERSAMPLE
    canvas = Image.fromarray(_background_array(scene.background, scene.size)).resize((w * s, h * s), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, scene.size, PALETTE[shape.colour], scene.outline)
    return canvas.resize((w, h), Image.BOX)


def coverage(shape: Shape, image_size: tuple[int, int], outline: bool = False) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 [H, W] in [0, 1]; the same drawing as `render`."""
    w, h = image_size
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, image_size, 255, outline)
    return np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def location_phrase(position: str) -> str:
    """Where something is: "at the top left", "in the center", "on the left"."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def background_phrase(background: Background) -> str:
    """A background in words: "white" or "red and white stripes"."""
    if background.texture is None:
        return background.colours[0]
    return f"{background.colours[0]} and {background.colours[1]} {background.texture}"


def shape_phrase(shape: Shape) -> str:
    """A shape in words: "a large red circle at the top left"."""
    return f"a {shape.size} {shape.colour} {shape.kind} {location_phrase(shape.position)}"


def describe(scene: Scene) -> str:
    """The exact description of the scene, the prompt for text-to-image; rendering it is the only right answer."""
    if scene.outline:
        raise ValueError("describe() covers filled shapes only; got an outlined scene")
    parts = [shape_phrase(s) for s in sorted(scene.shapes, key=lambda s: POSITIONS.index(s.position))]
    if len(parts) > 1:
        objects = ", ".join(parts[:-1]) + " and " + parts[-1]
    elif parts:
        objects = parts[0]
    else:
        objects = "nothing"
    bg = scene.background
    if bg.texture is None:
        return f"{objects} on a {bg.colours[0]} background"
    return f"{objects} on a background of {background_phrase(bg)}"
