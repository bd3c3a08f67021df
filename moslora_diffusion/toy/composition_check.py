"""Per-subject measure of a composed image (detect and compare, after MuDI's Detect-and-Compare): is every
prompted subject where the prompt or layout puts it, with its own pattern, and did identities mix?

    want = Expected(subjects=(("stripes", "left"), ("checker", "right")))      # sks star left, v square right
    verdict = measure(image, want)
    verdict.present   # {"stripes": True, "checker": False}: the object in each subject's place carries its pattern
    verdict.mixing    # True: an object found in a subject's place carries another subject's pattern (alone or mixed)
    verdict.joint     # every prompted concept present (the zigzag too when asked for) and no mixing

Detect: a subject's place is a box ((x0, y0, x1, y1) fractions of the image: a half for "on the left",
the whole image for a prompt that names no place, or the user's region); the object there is the largest
foreground region inside it (pair_checker.read_region; background from the image border as checker.py
does). Compare: its interior's pattern scores (patterns.py) against every subject's pattern: its own at
>= PATTERN_THRESHOLD is present; another subject's at >= PATTERN_THRESHOLD is identity mixing (the other
subject's pattern, or both at once). The zigzag background is read as patterns.background_pattern does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checker import interior
from .pair_checker import read_region
from .patterns import OBJECT_PATTERNS, PATTERN_THRESHOLD, ZIGZAG_THRESHOLD, pair_score, read_patterns

PLACES: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0), "any": (0.0, 0.0, 1.0, 1.0),
}


@dataclass(frozen=True)
class Expected:
    """What a prompt (and layout) asks for: (pattern, place) per subject, and whether the zigzag background is.

    pattern: a key of patterns.OBJECT_PATTERNS; place: a key of PLACES or a box of fractions (x0, y0, x1, y1)."""

    subjects: tuple[tuple[str, str | tuple[float, float, float, float]], ...] = ()
    zigzag: bool = False

    def __post_init__(self):
        for pattern, place in self.subjects:
            if pattern not in OBJECT_PATTERNS:
                raise ValueError(f"unknown pattern {pattern!r}: use one of {', '.join(OBJECT_PATTERNS)}")
            if isinstance(place, str) and place not in PLACES:
                raise ValueError(f"unknown place {place!r}: use one of {', '.join(PLACES)} or a box of fractions")


@dataclass
class Verdict:
    present: dict[str, bool]  # pattern -> its object found in its place, carrying it
    scores: dict[str, dict[str, float]]  # pattern -> every pattern's score of the object in its place
    mixing: bool
    zigzag: bool | None  # None: not asked for
    joint: bool
    found: dict[str, bool] = field(default_factory=dict)  # pattern -> any object in its place at all


def place_mask(place, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool of a place (PLACES key or box of fractions) on an image of `size` = (W, H)."""
    x0, y0, x1, y1 = PLACES[place] if isinstance(place, str) else place
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    mask[int(round(y0 * height)):int(round(y1 * height)), int(round(x0 * width)):int(round(x1 * width))] = True
    return mask


def object_scores(image, place) -> dict[str, float] | None:
    """Every subject pattern's score of the object in `place` (None: no object there)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    arr, mask = read_region(image, place_mask(place, (arr.shape[1], arr.shape[0])))
    if mask is None:
        return None
    inside = arr[interior(mask)]  # the rim blends object and background colours
    return {name: pair_score(inside, pair) for name, pair in OBJECT_PATTERNS.items()}


def zigzag_shown(image) -> bool:
    """The zigzag background concept: its two colours on the background's pixels (patterns.py)."""
    return read_patterns(image).zigzag >= ZIGZAG_THRESHOLD


def measure(image, expected: Expected) -> Verdict:
    """The verdict on one image (PIL or H x W x 3 array) for what its prompt / layout asks for."""
    present, scores, found, mixing = {}, {}, {}, False
    for pattern, place in expected.subjects:
        got = object_scores(image, place)
        found[pattern] = got is not None
        scores[pattern] = got or dict.fromkeys(OBJECT_PATTERNS, 0.0)
        present[pattern] = scores[pattern][pattern] >= PATTERN_THRESHOLD
        others = [p for p in OBJECT_PATTERNS if p != pattern]
        mixing |= any(scores[pattern][p] >= PATTERN_THRESHOLD for p in others)
    zigzag = zigzag_shown(image) if expected.zigzag else None
    joint = all(present.values()) and not mixing and zigzag is not False
    return Verdict(present, scores, mixing, zigzag, joint, found)


def rates(verdicts: list[Verdict]) -> dict[str, float]:
    """Shares over images: each subject's presence (`present_<pattern>`), `mixing`, `zigzag` (when asked for)
    and `joint`."""
    if not verdicts:
        raise ValueError("no verdicts to summarise")
    out = {f"present_{p}": float(np.mean([v.present[p] for v in verdicts])) for p in verdicts[0].present}
    out["mixing"] = float(np.mean([v.mixing for v in verdicts]))
    if verdicts[0].zigzag is not None:
        out["zigzag"] = float(np.mean([bool(v.zigzag) for v in verdicts]))
    out["joint"] = float(np.mean([v.joint for v in verdicts]))
    return out

