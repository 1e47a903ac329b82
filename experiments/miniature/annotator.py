"""The world's programmatic annotator: how well an image matches its caption, measured on pixels.

The caption is parsed back into (colour, shape, quadrant) triples. Each quadrant scores in [0, 1]:
- a named quadrant: presence x (colour + shape) / 2, where presence = min(1, foreground area /
  MIN_AREA), colour = exp(-(distance of the mean foreground colour to the named colour / 80)^2)
  and shape = exp(-((fill - named fill) / 0.12)^2), fill being the foreground area over its
  bounding box (square 1, circle pi/4, triangle 1/2);
- an unnamed quadrant: 1 - min(1, foreground area / MIN_AREA) (nothing should be there).
The score is the mean over the four quadrants; it is continuous, so ties between images are rare.
It pays for blank space: an empty image scores (unnamed quadrants) / 4, e.g. 0.75 for one object.

The content annotator (v2) scores what the caption names and nothing else:
    content = (sum over named quadrants of their score - sum over unnamed quadrants of presence) / named
so an image that draws every named object and nothing else scores as the world annotator's named
quadrants do (about 0.99 on rendered scenes), an empty image scores exactly 0, and every unnamed
quadrant that is drawn on costs up to 1 / named. Its range is [-3, 1].
Foreground: pixels farther than FOREGROUND_DISTANCE from the background colour (max over channels).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from PIL import Image

from miniature.world import BACKGROUND, CELL, COLOURS, POSITIONS, SHAPES, SIZE

FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
MIN_AREA = 30.0  # pixels: a 9 px triangle covers ~40
FOREGROUND_DISTANCE = 60.0
_OBJECT = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})")


def parse_caption(text: str) -> dict[int, tuple[str, str]]:
    """Quadrant index -> (colour, shape) named by a world caption."""
    return {POSITIONS.index(m.group(3)): (m.group(1), m.group(2)) for m in _OBJECT.finditer(text)}


def _quadrant(pixels: np.ndarray, position: int) -> np.ndarray:
    row, column = divmod(position, 2)
    return pixels[row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL]


def foreground(pixels: np.ndarray) -> np.ndarray:
    """Boolean mask [H, W] of the pixels of [H, W, 3] (float RGB) that are not background."""
    return np.abs(pixels - np.asarray(BACKGROUND, dtype=np.float64)).max(axis=-1) > FOREGROUND_DISTANCE


def foreground_fraction(image: Image.Image) -> float:
    """Fraction of an image's pixels that are foreground (a diagnostic, not part of the score)."""
    return float(foreground(np.asarray(image.convert("RGB"), dtype=np.float64)).mean())


def quadrant_score(cell: np.ndarray, named: tuple[str, str] | None) -> float:
    """Score of one quadrant [CELL, CELL, 3] (float RGB) against what the caption names there."""
    mask = foreground(cell)
    area = float(mask.sum())
    presence = min(1.0, area / MIN_AREA)
    if named is None:
        return 1.0 - presence
    if area == 0:
        return 0.0
    colour, shape = named
    distance = float(np.linalg.norm(cell[mask].mean(axis=0) - np.asarray(COLOURS[colour], dtype=np.float64)))
    rows, columns = np.nonzero(mask)
    fill = area / float((rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1))
    colour_score = math.exp(-((distance / 80.0) ** 2))
    shape_score = math.exp(-(((fill - FILL[shape]) / 0.12) ** 2))
    return presence * (colour_score + shape_score) / 2


def quadrant_scores(image: Image.Image, text: str) -> tuple[list[float], list[float]]:
    """The scores of the quadrants the caption names, and of those it leaves empty."""
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BILINEAR)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    named = parse_caption(text)
    scores = [quadrant_score(_quadrant(pixels, p), named.get(p)) for p in range(4)]
    return [scores[p] for p in range(4) if p in named], [scores[p] for p in range(4) if p not in named]


def score_image(image: Image.Image, text: str) -> float:
    """The annotator's score in [0, 1] of one image for one caption."""
    named, empty = quadrant_scores(image, text)
    return float(np.mean(named + empty))


def content_score(image: Image.Image, text: str) -> float:
    """The content annotator's score of one image for one caption (module docstring)."""
    named, empty = quadrant_scores(image, text)
    if not named:
        raise ValueError(f"content annotator: the caption names no object: {text!r}")
    return float((sum(named) - sum(1.0 - e for e in empty)) / len(named))


class WorldAnnotator:
    """dde_tools.annotators.Annotator for the world, usable by dde_tools.relabel."""

    name = "world"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt)."""
        return np.asarray([score_image(i, p) for i, p in zip(images, prompts)], dtype=np.float64)


class ContentAnnotator:
    """The content annotator as a dde_tools.annotators.Annotator (dde_tools.relabel can use it)."""

    name = "content"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt)."""
        return np.asarray([content_score(i, p) for i, p in zip(images, prompts)], dtype=np.float64)


ANNOTATORS = {"world": WorldAnnotator, "content": ContentAnnotator}
