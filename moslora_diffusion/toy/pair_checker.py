"""Reads a two-object toy image (pairs.py) from its pixels: both objects' classes, colours and positions.

    reading = check_pair(image)
    reading.axis                   # "horizontal" (left/right), "vertical" (top/bottom) or None (< 2 objects)
    reading.at("left").cls         # "star"
    read_region(image, region)     # the largest object inside a region mask (the composition measure's read)

The background model and foreground mask are the one-object checker's (checker.py). The two largest
connected foreground regions of at least PAIR_MIN_AREA pixels are the objects; the axis is the one along
which their centres lie farther apart, and the object nearer the left (top) is "left" ("top"). A lone
object takes the nearest one-object anchor as its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checker import (
    as_array,
    background_name,
    bbox,
    class_scores,
    components,
    foreground,
    nearest_colour,
    object_colour,
)
from .pairs import AXES
from .world import POSITIONS

# An 18 px object has >= 110 pixels; a blob of generated noise rarely reaches 30.
PAIR_MIN_AREA = 30


@dataclass(frozen=True)
class ObjectReading:
    cls: str
    colour: str
    position: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) px, x1/y1 exclusive
    area: int
    iou: float  # overlap with the best class template
    mask: np.ndarray  # (H, W) bool: the object's pixels

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class PairReading:
    objects: tuple[ObjectReading, ...]  # 0, 1 or 2, in (left, right) / (top, bottom) order
    axis: str | None
    background: str

    def at(self, position: str) -> ObjectReading | None:
        """The object read at `position`, or None."""
        return next((o for o in self.objects if o.position == position), None)


def read_object(arr: np.ndarray, mask: np.ndarray, position: str | None = None) -> ObjectReading:
    """Class (best template IoU), colour (median of the interior) and box of the object whose pixels are `mask`;
    `position` None: the nearest one-object anchor to its box centre."""
    x0, y0, x1, y1 = bbox(mask)
    if position is None:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0][0] - cx) ** 2 + (POSITIONS[p][0][1] - cy) ** 2)
    scores = class_scores(mask)
    cls = max(scores, key=scores.get)
    return ObjectReading(cls, nearest_colour(object_colour(arr, mask)), position, (x0, y0, x1, y1),
                         int(mask.sum()), scores[cls], mask)


def check_pair(image) -> PairReading:
    """Both objects of a two-object image (PIL image or H x W x 3 array), their positions from each other."""
    arr = as_array(image)
    mask, colours = foreground(arr)
    found = [c for c in components(mask)[:2] if c.sum() >= PAIR_MIN_AREA]
    background = background_name(colours)
    if len(found) < 2:
        return PairReading(tuple(read_object(arr, m) for m in found), None, background)
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in map(bbox, found)]
    dx, dy = abs(centres[0][0] - centres[1][0]), abs(centres[0][1] - centres[1][1])
    axis = "horizontal" if dx >= dy else "vertical"
    coordinate = 0 if axis == "horizontal" else 1
    order = sorted(range(2), key=lambda i: centres[i][coordinate])
    objects = tuple(read_object(arr, found[i], place) for i, place in zip(order, AXES[axis], strict=True))
    return PairReading(objects, axis, background)


def read_region(image, region: np.ndarray, min_area: int = PAIR_MIN_AREA) -> tuple[np.ndarray, np.ndarray | None]:
    """(the image array, the largest foreground region inside `region` ((H, W) bool) or None when it has fewer
    than `min_area` pixels). The background model comes from the whole image's border."""
    arr = as_array(image)
    mask, _ = foreground(arr)
    found = components(mask & region)
    if not found or found[0].sum() < min_area:
        return arr, None
    return arr, found[0]
