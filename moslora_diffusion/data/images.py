"""Reading photos: decided by content, one size rule, EXIF orientation, every PIL mode to 8-bit RGB.

Users hand us whatever their phone or editor wrote: rotated JPEGs, RGBA PNGs, 16-bit TIFFs, CMYK JPEGs
from print workflows, `.jfif` files, GIFs, 200-megapixel phone photos. The training scan and the app's
upload check both go through `inspect_photo`, so a photo is used or refused the same way in both:

- a file is a photo when Pillow recognises its *content* as one of PHOTO_FORMATS (the name does not
  matter); an animation gives its first frame;
- up to MAX_PIXELS (1000 MP, read from the header before anything is decoded); above, refused;
- above WORKING_PIXELS (64 MP) it is halved on load (2x, 4x, ...) until within, with a note saying so:
  JPEGs are decoded straight at the smaller scale, so a 200 MP JPEG costs 50 MP of memory, not 200.
Everything else only ever sees an upright RGB image (`load_rgb`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's format name -> the usual suffix (what the app names a staged copy). MPO: a phone JPEG with extra
# views; its first frame is the photo.
PHOTO_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
                 "GIF": ".gif", "AVIF": ".avif"}
MAX_PIXELS = 1_000_000_000  # 5x the largest phone sensor (200 MP); decoding one takes up to 4 GB
WORKING_PIXELS = 64_000_000  # larger photos are halved on load until within: still 8x a 1024 px training crop
SMALL_SIDE = 64  # a shorter side than this (or than half the training resolution) gets a warning
_NO_DECODER = {".heic": "HEIC/HEIF photos", ".heif": "HEIC/HEIF photos", ".dng": "camera RAW files",
               ".cr2": "camera RAW files", ".cr3": "camera RAW files", ".nef": "camera RAW files",
               ".arw": "camera RAW files", ".raf": "camera RAW files", ".orf": "camera RAW files",
               ".rw2": "camera RAW files"}

# What PIL raises for unreadable, truncated or hostile files. UnidentifiedImageError is an
# OSError; some decoders raise SyntaxError/EOFError/ValueError on malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)
_PIXEL_LIMIT_LOCK = threading.Lock()
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """A file that is not a usable photo; `reason` says why, without the path."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class PhotoInfo:
    """A checked photo. Sizes are (width, height) in pixels."""

    path: Path
    format: str  # Pillow's name: "JPEG", "PNG", "GIF", ...
    stored_size: tuple[int, int]  # as stored in the file
    size: tuple[int, int]  # as used: EXIF orientation applied, downscaled when over WORKING_PIXELS
    frames: int = 1  # an animation's frame count; only the first is used

    @property
    def downscaled(self) -> bool:
        return self.size[0] * self.size[1] < self.stored_size[0] * self.stored_size[1]

    def notes(self, resolution: int | None = None) -> list[str]:
        """What the user should be told about this photo (used all the same)."""
        (w, h), (sw, sh) = self.size, self.stored_size
        notes = []
        if self.downscaled:
            notes.append(f"{sw}x{sh} ({sw * sh / 1e6:.0f} MP) is downscaled on load to {w}x{h} (over "
                         f"{WORKING_PIXELS // 1_000_000} MP); a smaller copy would spare that work at every load")
        if self.frames > 1 and self.format != "MPO":
            notes.append(f"{self.frames} frames (an animation or pages): only the first is used")
        if self.too_small(resolution):
            target = f" for {resolution} px training" if resolution else ""
            notes.append(f"{w}x{h} is very small{target}: it is upscaled, so the model learns a blurry subject")
        return notes

    def too_small(self, resolution: int | None = None) -> bool:
        """A shorter side under SMALL_SIDE (or half the training resolution) that is upscaled: with a resolution
        given, only when the side is below it (a 48 px photo for 32 px training is downscaled, not upscaled)."""
        side = min(self.size)
        return side < max(SMALL_SIDE, (resolution or 0) // 2) and (not resolution or side < resolution)


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Pillow refuses pictures over ~179 MP as a "possible decompression bomb" before we can look at them. Our
    own limit is MAX_PIXELS, checked from the header; Pillow's global one is raised to it while one photo is
    read (the lock keeps overlapping reads from restoring it early), so Pillow's check stays as a backstop."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only above MAX_PIXELS: refused anyway
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def reduction_factor(size: tuple[int, int]) -> int:
    """1, 2, 4, ...: the smallest power of two that brings a (width, height) image within WORKING_PIXELS."""
    width, height = size
    factor = 1
    while -(-width // factor) * -(-height // factor) > WORKING_PIXELS:
        factor *= 2
    return factor


def _unidentified(path: Path) -> str:
    kind = _NO_DECODER.get(path.suffix.lower())
    if kind:
        return f"{kind} cannot be read here; convert it to JPEG or PNG first"
    return "not an image Pillow can read"


def _check_header(img: Image.Image, path: Path) -> None:
    if img.format not in PHOTO_FORMATS:
        raise ImageError(path, f"{img.format} images are not used as photos; save it as JPEG or PNG")
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(path, f"{width}x{height} ({width * height / 1e6:.0f} MP) is over the "
                               f"{MAX_PIXELS // 1_000_000} MP limit; resize it below that first")


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    if img.mode in ("1", "P", "PA") or img.mode.startswith("I;16"):  # reduce() cannot average these
        img = to_rgb(img)
    return img.reduce(factor)


def _decode_open(img: Image.Image, path: Path) -> tuple[Image.Image, PhotoInfo]:
    _check_header(img, path)
    image_format, stored, frames = img.format, img.size, getattr(img, "n_frames", 1)
    factor = reduction_factor(stored)
    if factor > 1 and image_format in ("JPEG", "MPO"):  # libjpeg decodes at 1/2, 1/4, 1/8 scale directly
        img.draft(img.mode, (-(-stored[0] // factor), -(-stored[1] // factor)))
    img.load()  # decodes every pixel: a truncated file fails here, at scan time, not in training
    _exif_transpose(img, path)
    factor = reduction_factor(img.size)
    if factor > 1:
        result = _reduce(img, factor)
    else:  # a single-frame file is closed once loaded; an animation keeps it open for seeking (GIF: in `_fp`,
        # even once `fp` is None): copy, so that _read closes the file
        result = img if frames == 1 and getattr(img, "fp", None) is None else img.copy()
    return result, PhotoInfo(path, image_format, stored, result.size, frames)


def _read(path: str | Path) -> tuple[Image.Image, PhotoInfo]:
    """The photo fully decoded, upright and within WORKING_PIXELS, with what was found on the way."""
    path = Path(path)
    try:
        with _our_pixel_limit():
            img = Image.open(path)
            try:
                result, info = _decode_open(img, path)
            except BaseException:
                img.close()
                raise
            if result is not img:
                img.close()
            return result, info
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError):
        raise ImageError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageError(path, _unidentified(path)) from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except _DECODE_ERRORS as err:
        raise ImageError(path, f"damaged or truncated ({' '.join(str(err).split()) or type(err).__name__})") from None


def inspect_photo(path: str | Path) -> PhotoInfo:
    """Checks that `path` is a usable photo by decoding it whole (the rules in this module's docstring).

    Raises ImageError (a ValueError) with the reason: not an image, a format we do not use, over MAX_PIXELS,
    damaged or truncated.
    """
    return _read(path)[1]


def identify_photo(path: str | Path) -> str | None:
    """The photo format of `path` from its header alone (cheap), or None when it is none we use."""
    try:
        with _our_pixel_limit(), Image.open(path) as img:
            return img.format if img.format in PHOTO_FORMATS else None
    except _DECODE_ERRORS:
        return None


def is_image_file(path: Path) -> bool:
    """A visible regular file whose content is a photo format we use (the name does not matter)."""
    return not path.name.startswith(".") and path.is_file() and identify_photo(path) is not None


def list_image_files(folder: str | Path) -> list[Path]:
    """Photo files directly inside `folder` (not recursive), by content, sorted by name.

    Hidden files are skipped: macOS writes `._photo.jpg` AppleDouble files next to every photo
    copied from a Mac, and they are not images.
    """
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def open_oriented(path: str | Path) -> Image.Image:
    """Open and fully decode a photo, EXIF-transposed and downscaled by the size rule, keeping its PIL mode
    (palette, 1-bit and 16-bit ones become RGB when they had to be downscaled)."""
    return _read(path)[0]


def _exif_transpose(img: Image.Image, path: Path) -> None:
    # In place: a copy of a 200 MP image would double the memory. A malformed EXIF block should not cost
    # the user a photo: keep it as stored, but say so.
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt EXIF
        warnings.warn(f"ignoring unreadable EXIF orientation in {path}: {err}", stacklevel=4)


def load_rgb(path: str | Path) -> Image.Image:
    """Load a photo upright (EXIF orientation applied, downscaled by the size rule) as 8-bit RGB.

    Raises ImageError (a ValueError) naming the file when it cannot be used.
    """
    img = open_oriented(path)
    try:
        return to_rgb(img)
    except _DECODE_ERRORS as err:
        raise ImageError(path, f"cannot convert mode {img.mode} to RGB: {err}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as used (after EXIF orientation and downscaling); decodes the whole file to validate it."""
    return inspect_photo(path).size


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
