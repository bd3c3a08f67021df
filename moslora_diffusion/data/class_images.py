"""Class images for prior preservation: count what is there, generate only what is missing.

The model is not needed here: the trainer passes `generate(prompts, seeds) -> images`.
Image k is generated with seed `seed + k`, so a run killed part-way and resumed produces the
same set as an uninterrupted run. Each file is written atomically (files/atomic.py: a temporary
in the same folder, then renamed), so a kill never leaves a half-written PNG behind. Existing
images count by content, as instance photos do (data/scan.py).
Call this from one process only (the main rank), then have the others wait.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..files.atomic import save_image
from .scan import find_photos

GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]
ProgressFn = Callable[[int, int], None]

_CLASS_NAME = re.compile(r"^class_(\d+)_(-?\d+)\.png$")


def class_image_name(index: int, seed: int) -> str:
    return f"class_{index:05d}_{seed}.png"


def _valid_class_images(class_dir: Path) -> list[Path]:
    """Readable photos already in `class_dir`; any other file is ignored with a warning saying why."""
    found = find_photos(class_dir)
    for skipped in found.skipped:
        warnings.warn(f"ignoring class image {skipped.path}: {skipped.reason}", stacklevel=3)
    return [photo.path for photo in found.photos]


def _free_indices(class_dir: Path, count: int) -> list[int]:
    """The `count` smallest indices no `class_<index>_*.png` file uses (valid or not)."""
    taken = set()
    for path in class_dir.iterdir():
        match = _CLASS_NAME.match(path.name)
        if match:
            taken.add(int(match.group(1)))
    free, index = [], 0
    while len(free) < count:
        if index not in taken:
            free.append(index)
        index += 1
    return free


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write `image` to `path` as PNG so that `path` is either absent or complete."""
    save_image(image, path, "PNG")


def _check_arguments(class_prompt: str, num_class_images: int, batch_size: int) -> None:
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise ValueError("prior preservation needs a non-empty class prompt")
    if num_class_images <= 0:
        raise ValueError(f"num_class_images must be > 0, got {num_class_images}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")


def ensure_class_images(
    class_dir: str | Path,
    class_prompt: str,
    num_class_images: int,
    generate: GenerateFn,
    batch_size: int = 4,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Make sure `class_dir` holds `num_class_images` readable images; return them (sorted).

    Existing images of any name count (users may supply real photos); only the shortfall is
    generated, `batch_size` at a time. `progress(done, total)` is called after each batch with
    the number generated so far and the number this call generates. When more images than
    asked for exist, the first `num_class_images` (by name) are returned, as diffusers does.
    """
    _check_arguments(class_prompt, num_class_images, batch_size)
    class_dir = Path(class_dir).expanduser()
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = _valid_class_images(class_dir)
    missing = num_class_images - len(existing)
    if missing > 0:
        written = _generate_missing(class_dir, class_prompt.strip(), missing, generate, batch_size, seed, progress)
        existing = sorted(existing + written, key=lambda p: p.name)
    return existing[:num_class_images]


def _generate_missing(
    class_dir: Path,
    prompt: str,
    missing: int,
    generate: GenerateFn,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None,
) -> list[Path]:
    indices = _free_indices(class_dir, missing)
    written = []
    for start in range(0, missing, batch_size):
        chunk = indices[start : start + batch_size]
        seeds = [seed + index for index in chunk]
        images = list(generate([prompt] * len(chunk), seeds))
        if len(images) != len(chunk):
            raise RuntimeError(f"generate returned {len(images)} images for {len(chunk)} prompts")
        for index, image_seed, image in zip(chunk, seeds, images, strict=True):
            path = class_dir / class_image_name(index, image_seed)
            save_png_atomic(image, path)
            written.append(path)
        if progress is not None:
            progress(start + len(chunk), missing)
    return written
