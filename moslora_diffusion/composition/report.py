"""Pictures of the regions a composition used, beside MoLE's gate heat map (mole/report.py).

One greyscale PNG per expert per image: white where the expert acted fully, black where it did not act (its share
w_i in [0, 1] times 255). The same file is a valid `--region_mask` input, so a layout found by `auto` can be reused
or edited and given back to `regional`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from ..files.atomic import save_image
from .regions import CompositionError


def mask_picture(mask: np.ndarray) -> Image.Image:
    """(H, W) float in [0, 1] -> a greyscale ("L") image of the same size."""
    return Image.fromarray(np.clip(np.rint(np.asarray(mask, dtype=np.float64) * 255), 0, 255).astype(np.uint8), "L")


def save_mask_pictures(masks: Mapping[str, np.ndarray], stem: str | Path) -> list[Path]:
    """Writes <stem>-mask-<expert>.png per expert (atomically); returns the paths."""
    stem = Path(stem)
    return [save_image(mask_picture(mask), stem.with_name(f"{stem.name}-mask-{name}.png"))
            for name, mask in masks.items()]


def read_mask_picture(path: str | Path) -> np.ndarray:
    """A mask image (greyscale, or RGB with equal channels; alpha ignored) -> (H, W) float32 value / 255.
    CompositionError (one line) for a missing file or a picture that is not a mask."""
    path = Path(path).expanduser()
    if path.is_dir():  # "mask file not found" for a folder that is there sent users looking for a typo
        raise CompositionError(f"{path} is a folder; a mask is a greyscale PNG file (white = the region)")
    if not path.is_file():
        raise CompositionError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            picture = image
    except (OSError, ValueError):
        raise CompositionError(f"{path}: not an image; a mask is a greyscale PNG (white = the region)") from None
    if picture.mode in ("1", "L", "LA", "I", "I;16"):
        values = np.asarray(picture.convert("I") if picture.mode.startswith("I") else picture.convert("L"),
                            dtype=np.float32)
        return values / (65535.0 if picture.mode.startswith("I") and values.max() > 255 else 255.0)
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise CompositionError(f"{path}: not a mask (a colour picture); give a greyscale PNG, white = the region")
    return rgb[..., 0] / 255.0
