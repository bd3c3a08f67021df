"""Loss masks for --masked_loss: which pixels of a photo are the subject.

Sources, in order (kohya sd-scripts' two conventions):
- a grey file `<stem>_mask.<ext>` beside `<stem>.<ext>` (white = subject = 1, black = background = 0, grey in
  between; colour files count by their luminance, with a warning naming the file);
- else the photo's own alpha channel (RGBA / LA PNGs, palette transparency), opaque = subject;
- else the photo has no mask: `check_masks` refuses the run, naming the photos, before the model is loaded.
  A silent weight of 1 would train the background into the subject, which is what the user asked to avoid;
  a photo meant to count whole gets an all-white mask.
A mask is read upright like its photo (EXIF orientation, the same size rule) and must have the photo's size or
at least its aspect ratio (then it is resized to it), so the crop and flip that the photo gets apply to it pixel
for pixel (dataset.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import ImageError, inspect_photo, open_oriented, to_rgb
from .scan import CAPTION_EXTENSIONS, MASK_SUFFIX, DatasetError, ImageRecord

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_file(photo: Path) -> Path | None:
    """`<stem>_mask.*` beside `photo` (any photo format, by content), or None. PNG first when several exist."""
    candidates = sorted(photo.parent.glob(f"{_glob_escape(photo.stem)}{MASK_SUFFIX}.*"),
                        key=lambda p: (p.suffix.lower() != ".png", p.name))
    return next((p for p in candidates if p.is_file() and p.suffix.lower() not in CAPTION_EXTENSIONS), None)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def photo_has_alpha(photo: Path) -> bool:
    """Whether the photo carries transparency (read from the header, no pixel decoded)."""
    with Image.open(photo) as img:
        return _has_alpha(img)


def mask_source(photo: Path) -> Path | str | None:
    """The mask file of `photo`, "alpha" when its alpha channel is the mask, or None when it has none."""
    found = mask_file(photo)
    if found is not None:
        return found
    return "alpha" if photo_has_alpha(photo) else None


def check_masks(records: Sequence[ImageRecord]) -> None:
    """Every photo has a usable mask (a readable file of the photo's aspect ratio, or its alpha channel).

    Raises DatasetError in one line naming the photos without one (or the bad mask file) and what to do.
    Decodes each mask file once, as the scan does the photos, so a bad one is reported before training.
    """
    missing = []
    for record in records:
        source = mask_source(record.path)
        if source is None:
            _check_orphan(record.path)
            missing.append(record.path.name)
        else:
            size = record.size or inspect_photo(record.path).size
            _check_not_empty(source if isinstance(source, Path) else record.path, load_mask(record.path, size))
    if missing:
        names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"--masked_loss: no mask for {names}: put a <name>_mask.png beside each photo (white = "
                           "subject, black = background; all white to count a photo whole) or give the photo an "
                           "alpha channel, or train without --masked_loss")


def _check_orphan(photo: Path) -> None:
    """A `<stem>_mask` file counted as a photo because its own photo is missing (renamed, or not copied)."""
    if photo.stem.endswith(MASK_SUFFIX):
        raise DatasetError(f"--masked_loss: {photo.name} looks like a mask but its photo "
                           f"{photo.stem[: -len(MASK_SUFFIX)]}.* is missing: add the photo beside it, or move the "
                           "mask out of the folder")


def _check_not_empty(source: Path, mask: Image.Image) -> None:
    """An all-black mask (or a fully transparent photo) marks no subject: its photo would train nothing, silently
    (masked_row_mse scores a row without subject 0)."""
    if mask.getextrema()[1] == 0:
        what = f"mask {source.name}" if source.stem.endswith(MASK_SUFFIX) else f"alpha channel of {source.name}"
        raise DatasetError(f"--masked_loss: the {what} marks no subject (all black / transparent), so its photo "
                           "would train nothing: paint the subject white (an inverted mask?), or remove the photo")


def _checked_mask_file(path: Path, photo_size: tuple[int, int]) -> Image.Image:
    """The mask file as an "L" image of `photo_size` (width, height); DatasetError when it cannot be one."""
    try:
        rgb = to_rgb(open_oriented(path))
    except ImageError as err:
        raise DatasetError(f"--masked_loss: mask {path}: {err.reason}") from None
    pixels = np.asarray(rgb)
    if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])):
        warnings.warn(f"--masked_loss: mask {path.name} is a colour image; its luminance is the mask (white = "
                      "subject, black = background): save it in greys if it marks the subject otherwise",
                      stacklevel=2)
    img = rgb.convert("L")
    if img.size != photo_size:
        (w, h), (pw, ph) = img.size, photo_size
        if abs(w * ph - h * pw) > max(pw, ph):  # more than a pixel of rounding apart: not this photo's mask
            raise DatasetError(f"--masked_loss: mask {path} is {w}x{h} but its photo is {pw}x{ph}; save the mask at "
                               "the photo's size")
        img = img.resize(photo_size, Image.Resampling.BILINEAR)
    return img


def load_mask(photo: Path, photo_size: tuple[int, int]) -> Image.Image:
    """The mask of `photo` as an "L" image of `photo_size` (width, height, as load_rgb gives the photo)."""
    source = mask_source(photo)
    if isinstance(source, Path):
        return _checked_mask_file(source, photo_size)
    if source == "alpha":
        img = open_oriented(photo)
        return img.convert("RGBA").getchannel("A")
    raise DatasetError(f"--masked_loss: no mask for {photo}")


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """"L" image -> float32 (1, H, W) in [0, 1], 1 = subject."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0)
