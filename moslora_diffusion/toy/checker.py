"""Reads what a toy-world image shows, from its pixels alone.

    reading = check(image)   # Reading(cls="star", colour="red", size="small", position="left", ...)

Background: two colour clusters of the 2 px border (a texture has two colours); a pixel is foreground when
it is far from the segment between them. The largest connected foreground region is the object: its
(eroded) median colour gives the colour word, its bounding-box centre the position, its box side the size,
and its class is the template whose rendering at that box overlaps it best (IoU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from .world import (
    BACKGROUND_COLOURS,
    CLASSES,
    COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    RESOLUTION,
    SIZES,
    shape_mask,
)

FOREGROUND_DISTANCE = 55.0  # RGB distance from the background model that counts as object
MIN_AREA = 12  # pixels: less than this is noise, not an object
LARGE_SIDE = (SIZES["small"] + SIZES["large"]) / 2


@dataclass
class Reading:
    cls: str | None  # None: no object found
    colour: str | None
    size: str | None
    position: str | None
    background: str
    area: int = 0
    iou: float = 0.0  # overlap with the best class template: how shape-like the object is
    class_scores: dict[str, float] = field(default_factory=dict)


def as_array(image) -> np.ndarray:
    """H x W x 3 float array in 0..255 from a PIL image or a uint8 / 0..1 float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    arr = np.asarray(image, dtype=np.float64)
    return arr * 255.0 if arr.max() <= 1.0 else arr


def _border(arr: np.ndarray, width: int = 2) -> np.ndarray:
    frame = np.ones(arr.shape[:2], dtype=bool)
    frame[width:-width, width:-width] = False
    return arr[frame]


def background_model(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two colours of the background (equal for a plain one): 2-means on the border pixels."""
    return _two_colours(_border(arr))


def _two_colours(pixels: np.ndarray, retry: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """2-means of (N, 3) pixels, seeded with their median and the pixel farthest from it. A cluster of < 8%
    is an object reaching into the border: it is dropped and the rest modelled again, since the farthest
    pixel was the object's and the background may still have two colours (a yellow cross near the edge of
    a black striped background was read as a one-colour background, and the stripes as the object)."""
    a = np.median(pixels, axis=0)
    dist = np.linalg.norm(pixels - a, axis=1)
    if np.percentile(dist, 90) < 25:
        return a, a
    b = pixels[dist.argmax()]
    for _ in range(8):
        near_a = np.linalg.norm(pixels - a, axis=1) <= np.linalg.norm(pixels - b, axis=1)
        if near_a.mean() > 0.92 or near_a.mean() < 0.08:
            rest = pixels[near_a] if near_a.mean() > 0.5 else pixels[~near_a]
            return _two_colours(rest, retry=False) if retry else (np.median(rest, axis=0),) * 2
        a, b = np.median(pixels[near_a], axis=0), np.median(pixels[~near_a], axis=0)
    return a, b


def distance_from_background(arr: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each pixel's RGB distance from the segment a-b (antialiased texture edges lie on it)."""
    ab = b - a
    denom = float(ab @ ab)
    t = np.clip(((arr - a) @ ab) / denom, 0, 1) if denom > 0 else np.zeros(arr.shape[:2])
    return np.linalg.norm(arr - (a + t[..., None] * ab), axis=-1)


def label_components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected regions of a boolean mask (label propagation; 64x64 needs no scipy): each
    region's pixels share one label (its smallest flat index), pixels outside the mask get mask.size + 1."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            return labels
        labels = new


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask as boolean masks, largest first."""
    if not mask.any():
        return []
    labels = label_components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    return [labels == ids[i] for i in np.argsort(-counts, kind="stable")]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (the mask itself when empty)."""
    found = components(mask)
    return found[0] if found else mask


def nearest_colour(rgb, names=OBJECT_COLOURS) -> str:
    return min(names, key=lambda n: float(np.linalg.norm(np.asarray(COLOURS[n], dtype=float) - rgb)))


def foreground(arr: np.ndarray, threshold: float = FOREGROUND_DISTANCE) -> tuple[np.ndarray, tuple]:
    """(every pixel that is not background, the background's two colours) of an image array."""
    a, b = background_model(arr)
    return distance_from_background(arr, a, b) > threshold, (a, b)


def object_mask(arr: np.ndarray, threshold: float = FOREGROUND_DISTANCE) -> tuple[np.ndarray, tuple]:
    """(object mask, the background's two colours) of an image array."""
    mask, colours = foreground(arr, threshold)
    return largest_component(mask), colours


def background_name(colours) -> str:
    """A texture's base colour is a palette colour, its second colour a shade of it: take the closer one."""
    best = min((np.linalg.norm(np.asarray(COLOURS[n], dtype=float) - c), n) for c in colours
                for n in BACKGROUND_COLOURS)
    return best[1]


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _template(cls: str, box) -> np.ndarray:
    soft = shape_mask(cls, box, (RESOLUTION, RESOLUTION), scale=4).reduce(4)
    return np.asarray(soft) >= 128


def class_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with every class template drawn at the mask's bounding box."""
    box = bbox(mask)
    scores = {}
    for cls in CLASSES:
        template = _template(cls, box)
        union = np.logical_or(mask, template).sum()
        scores[cls] = float(np.logical_and(mask, template).sum() / union) if union else 0.0
    return scores


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask less its 1 px rim, whose antialiased pixels blend object and background colours (the mask
    itself when too little is left)."""
    inner = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3))) > 0
    return inner if inner.sum() >= MIN_AREA // 2 else mask


def object_colour(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median colour of the mask's interior (edges blend with the background)."""
    return np.median(arr[interior(mask)], axis=0)


def check(image) -> Reading:
    """What the image shows: class, colour, size, position of its object, and its background colour."""
    arr = as_array(image)
    mask, colours = object_mask(arr)
    background = background_name(colours)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Reading(None, None, None, None, background, area)
    x0, y0, x1, y1 = bbox(mask)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0][0] - cx) ** 2 + (POSITIONS[p][0][1] - cy) ** 2)
    size = "large" if max(x1 - x0, y1 - y0) >= LARGE_SIDE else "small"
    scores = class_scores(mask)
    cls = max(scores, key=scores.get)
    return Reading(cls, nearest_colour(object_colour(arr, mask)), size, position, background, area,
                   scores[cls], scores)
