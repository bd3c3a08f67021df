"""Finding the instance photos and their captions in a user's folder.

Conventions users bring from other tools:
- a caption sidecar `<stem>.caption` (kohya's default) or `<stem>.txt` (what many users write);
- kohya sub-folders `<repeats>_<prompt>`, e.g. `10_sks dog`;
- plain photos in the folder, captioned with `--instance_prompt` (diffusers' DreamBooth).
Every image is decoded once here, so a bad file is reported before training starts.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageError, image_size, list_image_files

CAPTION_EXTENSIONS = (".caption", ".txt")  # first match wins: kohya's default, then common use

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """The training data folder cannot be used as given."""


@dataclass(frozen=True)
class ImageRecord:
    """One training photo. `size` is (width, height) after EXIF orientation, when known."""

    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] | None = None


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """`"10_sks dog"` -> (10, "sks dog"); None when the name does not follow the convention."""
    match = _REPEATS_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).strip()


def read_caption_sidecar(image_path: Path) -> str | None:
    """The caption next to an image (first non-empty line), or None when there is none.

    `utf-8-sig` so a BOM written by Windows Notepad does not end up in the prompt.
    """
    for extension in CAPTION_EXTENSIONS:
        sidecar = image_path.with_suffix(extension)
        if not sidecar.is_file():
            continue
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DatasetError(f"caption file {sidecar} is not UTF-8 text: {err}") from err
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[0]
        warnings.warn(f"caption file {sidecar} is empty; ignoring it", stacklevel=2)
    return None


def _require_folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DatasetError(f"instance data folder does not exist: {folder}")
    if not folder.is_dir():
        raise DatasetError(f"instance data path is not a folder: {folder}")
    return folder


def _candidates(folder: Path) -> list[tuple[Path, int, str | None]]:
    """(image path, repeats, folder prompt) for plain images and `<N>_<prompt>` sub-folders."""
    found: list[tuple[Path, int, str | None]] = [(p, 1, None) for p in list_image_files(folder)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_repeats_folder(sub.name)
        if parsed is None:
            warnings.warn(
                f"ignoring sub-folder {sub}: name is not '<repeats>_<prompt>' (e.g. '10_sks dog')",
                stacklevel=3,
            )
            continue
        repeats, prompt = parsed
        if repeats < 1:
            warnings.warn(f"ignoring sub-folder {sub}: 0 repeats", stacklevel=3)
            continue
        found.extend((p, repeats, prompt or None) for p in list_image_files(sub))
    return found


def _readable_size(path: Path) -> tuple[int, int] | None:
    try:
        return image_size(path)
    except ImageError as err:
        warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=3)
        return None


def scan_instance_folder(folder: str | Path, instance_prompt: str | None) -> list[ImageRecord]:
    """Records for every readable image in `folder`, with caption and repeats resolved.

    Caption precedence: sidecar file, then the `<N>_<prompt>` folder's prompt, then
    `instance_prompt`. Unreadable images are skipped with a warning naming them.
    Raises DatasetError when the folder is missing, holds no images, none is readable,
    or an image has no caption from any source.
    """
    folder = _require_folder(folder)
    candidates = _candidates(folder)
    if not candidates:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"no image files ({extensions}) in {folder}")
    fallback = (instance_prompt or "").strip() or None
    records = []
    for path, repeats, folder_prompt in candidates:
        size = _readable_size(path)
        if size is None:
            continue
        caption = read_caption_sidecar(path) or folder_prompt or fallback
        if caption is None:
            raise DatasetError(
                f"no caption for {path}: give an instance prompt, a {path.stem}.caption or "
                f"{path.stem}.txt file, or put it in a '<repeats>_<prompt>' sub-folder"
            )
        records.append(ImageRecord(path, caption, repeats, size))
    if not records:
        raise DatasetError(f"none of the {len(candidates)} image files in {folder} is readable")
    return records
