"""The procedural world: 32 x 32 RGB scenes of 1-3 coloured shapes in the four quadrants.

A scene puts at most one object in each quadrant (top left, top right, bottom left, bottom
right); an object has a colour (red, green, blue, yellow), a shape (square, circle, triangle), a
size and a small offset from the quadrant's centre. Its caption names the count, then every
object in quadrant order, e.g. "two shapes: a red square top left, a blue circle bottom right".
Everything is a pure function of a numpy Generator, so a seed fixes a data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels per side
CELL = SIZE // 2  # a quadrant
BACKGROUND = (20, 20, 20)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    position: int  # index into POSITIONS
    size: int = 11  # bounding box side in pixels
    offset: tuple[int, int] = (0, 0)  # (dx, dy) of the centre from the quadrant's centre


Scene = tuple[WorldObject, ...]  # sorted by position, positions distinct


def sample_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
    """1-3 objects (or exactly `count`) in distinct quadrants with random colour, shape, size and
    jitter."""
    count = int(rng.integers(1, 4)) if count is None else count
    positions = sorted(int(p) for p in rng.choice(4, size=count, replace=False))
    return tuple(
        WorldObject(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            position=p,
            size=int(rng.integers(9, 14)),
            offset=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))),
        )
        for p in positions
    )


def caption(scene: Scene) -> str:
    """The scene's caption: the count, then each object in quadrant order."""
    parts = [f"a {o.colour} {o.shape} {POSITIONS[o.position]}" for o in sorted(scene, key=lambda o: o.position)]
    return f"{COUNT_WORDS[len(scene)]}: " + ", ".join(parts)


def _draw_object(draw: ImageDraw.ImageDraw, obj: WorldObject) -> None:
    row, column = divmod(obj.position, 2)
    cx = column * CELL + CELL / 2 + obj.offset[0]
    cy = row * CELL + CELL / 2 + obj.offset[1]
    half = obj.size / 2
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    fill = COLOURS[obj.colour]
    if obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:  # an upright isosceles triangle filling half its box
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        _draw_object(draw, obj)
    return image


def corrupt(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one attribute of one object changed (colour, shape or position): the
    caption of the result no longer describes the rendering of `scene` (imperfect data)."""
    objects = list(scene)
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    what = int(rng.integers(3))
    if what == 0:
        colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        objects[k] = WorldObject(colour, obj.shape, obj.position, obj.size, obj.offset)
    elif what == 1:
        shape = str(rng.choice([s for s in SHAPES if s != obj.shape]))
        objects[k] = WorldObject(obj.colour, shape, obj.position, obj.size, obj.offset)
    else:
        free = [p for p in range(4) if p not in {o.position for o in objects}]  # >= 1: at most 3 objects
        objects[k] = WorldObject(obj.colour, obj.shape, int(rng.choice(free)), obj.size, obj.offset)
    return tuple(sorted(objects, key=lambda o: o.position))


def prompts(seed: int, count: int, exclude: set[str] | frozenset[str] = frozenset(),
            objects: int | None = None) -> list[str]:
    """`count` distinct captions of random scenes (of exactly `objects` objects when given), none of
    them in `exclude` (held-out prompts)."""
    rng = np.random.default_rng(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        text = caption(sample_scene(rng, objects))
        if text not in exclude:
            found[text] = None
    return list(found)
