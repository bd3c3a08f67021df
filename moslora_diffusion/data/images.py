"""Reading training photos: EXIF orientation, every PIL mode to 8-bit RGB, clear errors.

Users hand us whatever their phone or editor wrote: rotated JPEGs, RGBA PNGs, 16-bit TIFFs,
CMYK JPEGs from print workflows. Everything goes through `load_rgb` so the rest of the code
only ever sees an upright RGB image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# What PIL raises for unreadable, truncated or hostile files. UnidentifiedImageError is an
# OSError; some decoders raise SyntaxError/EOFError/ValueError on malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)

_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image file that cannot be read or decoded."""


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with one of the supported extensions."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name.

    Hidden files are skipped: macOS writes `._photo.jpg` AppleDouble files next to every photo
    copied from a Mac, and they are not images.
    """
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def open_oriented(path: str | Path) -> Image.Image:
    """Open, fully decode and EXIF-transpose an image, keeping its PIL mode.

    `Image.open` only parses the header; `load()` forces the whole decode so a truncated JPEG
    fails here, at scan time, rather than in the middle of training.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            oriented = _exif_transpose(img, path)
            # exif_transpose returns `img` itself when upright; copy so closing the file is safe.
            return oriented.copy() if oriented is img else oriented
    except FileNotFoundError as err:
        raise ImageError(f"image file not found: {path}") from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot read image {path}: {err}") from err


def _exif_transpose(img: Image.Image, path: Path) -> Image.Image:
    # A malformed EXIF block should not cost the user a photo: keep it as stored, but say so.
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt EXIF
        warnings.warn(f"ignoring unreadable EXIF orientation in {path}: {err}", stacklevel=3)
        return img


def load_rgb(path: str | Path) -> Image.Image:
    """Load an image upright (EXIF orientation applied) as 8-bit RGB.

    Raises ImageError (a ValueError) naming the file when it cannot be decoded.
    """
    img = open_oriented(path)
    try:
        return to_rgb(img)
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot convert image {path} (mode {img.mode}) to RGB: {err}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation; decodes the whole file to validate it."""
    return open_oriented(path).size


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency is composited on white (a transparent background would otherwise become black,
    which the model then learns as part of the subject). High bit-depth modes are rescaled,
    not clipped: PIL's own `convert("L")` clips 16-bit values, turning most pixels white.
    """
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        # Palette or colour-key transparency (PNG tRNS): make it a real alpha channel first.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's converters are correct for 8-bit data.
    return img.convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a single-channel integer/float image to uint8 (H, W).

    - I;16 variants: 0..65535 -> 0..255 (divide by 257, so 65535 -> 255 exactly).
    - I (32-bit int): usually a 16-bit PNG/TIFF decoded as I. Treated as 16-bit when any value
      exceeds 255, else as 8-bit data stored wide (a real 16-bit photo never peaks at 255/65535).
    - F (float): [0, 1] data when the maximum is <= 1, else [0, 255].
    """
    values = np.asarray(img).astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        values = values / 257.0
    elif img.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
