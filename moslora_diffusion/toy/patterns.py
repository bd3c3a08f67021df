"""Which pattern an image's object carries and whether its background is the zigzag, from pixels alone.

    read_patterns(image)      # PatternReading(object_scores={"stripes": 0.62, "checker": 0.0}, zigzag=0.0)
    pattern_of(image)         # "stripes" (the first subject's), "checker" (the second's), "stripes+checker", None
    background_pattern(image) # "zigzag" or None

Every pattern here is a pair of palette colours that no ordinary world image puts together: a pattern's score
is 2 x the smaller share of the region's pixels whose nearest palette colour is one of the pair (1.0: half and
half; 0: one colour missing). The object is the interior of `checker.object_mask`'s region (its antialiased
1 px rim mixes object and background colours); the background is everything outside the region.
Scores from colour shares survive the blur a 64 px diffusion model adds, which pattern geometry does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checker import as_array, interior, object_mask
from .world import COLOURS, ZIGZAG_COLOURS

# The subjects' object patterns (subject.py): name -> its two colours (the first is the fill's base colour).
OBJECT_PATTERNS: dict[str, tuple[str, str]] = {"stripes": ("yellow", "black"), "checker": ("red", "white")}
# From which score an object carries a pattern: each colour on >= 10% of the object's interior. On 1,000
# random framings each, subject renders score >= 0.72, ordinary objects and the other subject's pattern 0.00;
# the subjects' photos after the toy VAE's round trip 0.65-0.80 (tests/test_toy_patterns.py, test_toy_assets.py).
PATTERN_THRESHOLD = 0.2
# From which score the background is the zigzag: each colour on >= 20% of the background's pixels. Zigzag
# renders score >= 0.89 (blurred and noisy too) and world backgrounds 0.00, so any threshold between separates
# them; generated zigzags blur their band edges into mixed colours, and two clearly zigzag images of the
# learnability probe scored 0.43 and 0.46, so the threshold sits low in that gap.
ZIGZAG_THRESHOLD = 0.4

_NAMES = list(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=float)


def nearest_palette_index(pixels: np.ndarray) -> np.ndarray:
    """(N,) index into COLOURS of the nearest palette colour of each of (N, 3) RGB pixels (0..255)."""
    return np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=-1).argmin(axis=1)


def colour_shares(pixels: np.ndarray, names: tuple[str, ...]) -> tuple[float, ...]:
    """For each palette colour in `names`, the share of (N, 3) `pixels` nearest to it (zeros when N = 0)."""
    if len(pixels) == 0:
        return (0.0,) * len(names)
    nearest = nearest_palette_index(pixels)
    return tuple(float((nearest == _NAMES.index(n)).mean()) for n in names)


def pair_score(pixels: np.ndarray, pair: tuple[str, str]) -> float:
    """0..1: 2 x the smaller share of the pair's colours among `pixels` (both halves present: 1)."""
    return min(1.0, 2.0 * min(colour_shares(pixels, pair)))


@dataclass(frozen=True)
class PatternReading:
    object_scores: dict[str, float]  # OBJECT_PATTERNS name -> score of the object's pixels
    zigzag: float  # score of the background's pixels for the zigzag's colours

    @property
    def object_patterns(self) -> tuple[str, ...]:
        """The patterns the object carries, in OBJECT_PATTERNS order (two: one bled into the other)."""
        return tuple(name for name, score in self.object_scores.items() if score >= PATTERN_THRESHOLD)


def read_patterns(image) -> PatternReading:
    """Object-pattern and zigzag scores of a PIL image or H x W x 3 array (one segmentation for both)."""
    arr = as_array(image)
    mask, _ = object_mask(arr)
    inside = arr[interior(mask)]  # the rim blends object and background: a white star's on red read as checker
    scores = {name: pair_score(inside, pair) for name, pair in OBJECT_PATTERNS.items()}
    return PatternReading(scores, pair_score(arr[~mask], ZIGZAG_COLOURS))


def pattern_of(image) -> str | None:
    """The pattern the object carries: "stripes", "checker", both joined by "+" (bleed), or None (plain)."""
    found = read_patterns(image).object_patterns
    return "+".join(found) if found else None


def background_pattern(image) -> str | None:
    """"zigzag" when the background is the zigzag concept, None for any world background."""
    return "zigzag" if read_patterns(image).zigzag >= ZIGZAG_THRESHOLD else None
