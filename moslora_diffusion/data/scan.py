"""Finding the instance photos and their captions in a user's folder.

Conventions users bring from other tools:
- a caption sidecar `<stem>.caption` (kohya's default) or `<stem>.txt` (what many users write);
- kohya sub-folders `<repeats>_<prompt>`, e.g. `10_sks dog`;
- plain photos in the folder, captioned with `--instance_prompt` (diffusers' DreamBooth).
A file is a photo by its content, not its name (data/images.py), and every photo is decoded once here, so a
bad file is reported, with the reason, before training starts.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .images import PHOTO_FORMATS, ImageError, PhotoInfo, inspect_photo

CAPTION_EXTENSIONS = (".caption", ".txt")  # first match wins: kohya's default, then common use
MASK_SUFFIX = "_mask"  # `<photo>_mask.png` beside `<photo>.jpg`: a mask (for a masked loss), not a photo

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """The training data folder cannot be used as given."""


@dataclass(frozen=True)
class ImageRecord:
    """One training photo. `size` is (width, height) as loaded (upright, downscaled by the size rule), when known."""

    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class FolderPhotos:
    """What one folder holds: the photos (checked by content), their masks, and the other files with why they are
    not used."""

    photos: list[PhotoInfo]
    skipped: list[Skipped]
    masks: list[Path] = field(default_factory=list)  # `<photo>_mask.*` files: read with --masked_loss (masks.py)


def find_photos(folder: str | Path) -> FolderPhotos:
    """Every photo directly inside `folder`, decided by content (data/images.py, also the app's upload check).

    Not photos, and not reported: hidden files (macOS `._x.jpg`, `.DS_Store`) and caption sidecars. Listed
    apart: masks (`<photo>_mask.*` beside `<photo>.*`). Reported as skipped: every file that is no usable photo,
    with the reason.
    """
    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)
    files = [p for p in files if p.suffix.lower() not in CAPTION_EXTENSIONS]
    stems = {p.stem for p in files}
    found = FolderPhotos([], [])
    for path in files:
        if path.stem.endswith(MASK_SUFFIX) and path.stem[: -len(MASK_SUFFIX)] in stems:
            found.masks.append(path)
            continue
        try:
            found.photos.append(inspect_photo(path))
        except ImageError as err:
            found.skipped.append(Skipped(path, err.reason))
    return found


@dataclass
class PhotoScan:
    """The instance photos of a run: records to train on, and what the user should be told."""

    folder: Path
    records: list[ImageRecord]
    photos: dict[Path, PhotoInfo]
    skipped: list[Skipped]
    masks: list[Path] = field(default_factory=list)

    def report(self, resolution: int | None = None) -> list[str]:
        """Lines for the run's log: how many photos are used, what was skipped and why, notes per photo."""
        used = len(self.records)
        items = sum(r.repeats for r in self.records)
        head = f"Photos: {used} used from {self.folder}" + (f" ({items} with repeats)" if items != used else "")
        masks = f", {len(self.masks)} masks (<name>_mask files: used only with --masked_loss)" if self.masks else ""
        lines = [head + masks + (f", {len(self.skipped)} files skipped" if self.skipped else "")]
        lines += [f"  skipped {_relative(s.path, self.folder)}: {s.reason}" for s in self.skipped]
        for record in self.records:
            lines += [f"  note {_relative(record.path, self.folder)}: {note}"
                      for note in self.photos[record.path].notes(resolution)]
        return lines
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


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _photo_folders(folder: Path) -> list[tuple[Path, int, str | None]]:
    """(folder, repeats, folder prompt): `folder` itself, then kohya's `<N>_<prompt>` sub-folders."""
    found: list[tuple[Path, int, str | None]] = [(folder, 1, None)]
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
        found.append((sub, repeats, prompt or None))
    return found


def scan_photos(folder: str | Path, instance_prompt: str | None, warn: bool = False) -> PhotoScan:
    """Every usable photo in `folder` (and its `<N>_<prompt>` sub-folders), with caption and repeats resolved.

    Caption precedence: sidecar file, then the `<N>_<prompt>` folder's prompt, then `instance_prompt`.
    Files that are no usable photo are skipped and listed in the result (warn=True: also as warnings).
    Raises DatasetError when the folder is missing, holds no photo, none is usable, or a photo has no
    caption from any source.
    """
    folder = _require_folder(folder)
    fallback = (instance_prompt or "").strip() or None
    scan = PhotoScan(folder, [], {}, [])
    for photo_folder, repeats, folder_prompt in _photo_folders(folder):
        found = find_photos(photo_folder)
        scan.skipped += found.skipped
        scan.masks += found.masks
        for skipped in found.skipped if warn else ():
            warnings.warn(f"skipping {skipped.path}: {skipped.reason}", stacklevel=2)
        for photo in found.photos:
            caption = read_caption_sidecar(photo.path) or folder_prompt or fallback
            if caption is None:
                raise DatasetError(
                    f"no caption for {photo.path}: give an instance prompt, a {photo.path.stem}.caption or "
                    f"{photo.path.stem}.txt file, or put it in a '<repeats>_<prompt>' sub-folder"
                )
            scan.records.append(ImageRecord(photo.path, caption, repeats, photo.size))
            scan.photos[photo.path] = photo
    if not scan.records:
        _no_photos(folder, scan.skipped)
    return scan


def _no_photos(folder: Path, skipped: list[Skipped]) -> None:
    formats = ", ".join(dict.fromkeys(f.replace("MPO", "JPEG") for f in PHOTO_FORMATS))
    if not skipped:
        raise DatasetError(f"no image files in {folder}: put the subject's photos there ({formats}; the content "
                           "decides, not the file name)")
    reasons = "; ".join(f"{_relative(s.path, folder)}: {s.reason}" for s in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    raise DatasetError(f"no readable photo in {folder} ({len(skipped)} skipped: {reasons}{more})")


def scan_instance_folder(folder: str | Path, instance_prompt: str | None) -> list[ImageRecord]:
    """The records of `scan_photos`, with a warning naming each skipped file (for callers without a report)."""
    return scan_photos(folder, instance_prompt, warn=True).records
