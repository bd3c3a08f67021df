"""Subject photos from the browser or from a folder the app was given, checked before any use.

A photo is judged exactly as the trainer judges it (data/images.py, `inspect_photo`): by its content, not its
name, fully decoded, at most MAX_PIXELS (read from the header before decoding), and downscaled on load above
WORKING_PIXELS, which the user is told. Uploads are also bounded in bytes and in number.

A mask uploaded with its photo (`<name>_mask.png` beside `<name>.jpg`, kohya's convention, data/masks.py) is
staged as that photo's mask, `photo_NNN_mask.<ext>`, so the trainer reads it as a mask, never as a photo.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import PHOTO_FORMATS, ImageError, PhotoInfo, identify_photo, inspect_photo
from ..data.masks import check_masks
from ..data.scan import MASK_SUFFIX, DatasetError, FolderPhotos, find_photos, scan_photos
from ..files.atomic import atomic_write
from .paths import AllowedRoots

MAX_UPLOAD_BYTES = 100 * 2**20  # a 200 MP phone JPEG is 30-60 MB
MAX_UPLOAD_FILES = 100


class UploadError(ValueError):
    """A file that is not an acceptable photo; the message names it."""


def check_image(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES) -> PhotoInfo:
    """`path` checked as a photo (see the module docstring); UploadError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(f"{path.name}: {size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB limit")
    try:
        return inspect_photo(path)
    except ImageError as err:  # the reason only: the full path is the server's temporary one
        raise UploadError(f"{path.name}: {err.reason}") from None


@dataclass
class StagedUploads:
    """Uploads copied into `folder` under our own names."""

    folder: Path
    photos: list[tuple[str, PhotoInfo]]  # (uploaded name, the staged copy's PhotoInfo), in upload order
    masks: list[tuple[str, Path]] = field(default_factory=list)  # (uploaded name, staged mask `photo_NNN_mask.*`)

    def uploaded_names(self) -> dict[str, str]:
        """Staged file name -> the name the user uploaded it under (for messages)."""
        return {path.name: name for name, path in [(n, i.path) for n, i in self.photos] + self.masks}


def pair_masks(files: list[Path]) -> tuple[list[Path], dict[int, Path]]:
    """(photos, {photo index: its mask}) by the uploaded names: `<stem>_mask.*` is the mask of the upload `<stem>.*`
    (the rule data/scan.py applies in a folder); a `_mask` file without such a photo is a photo."""
    stems = {path.stem for path in files}
    is_mask = {path: path.stem.endswith(MASK_SUFFIX) and path.stem[: -len(MASK_SUFFIX)] in stems for path in files}
    photos = [path for path in files if not is_mask[path]]
    index = {path.stem: i for i, path in enumerate(photos)}
    return photos, {index[path.stem[: -len(MASK_SUFFIX)]]: path for path in files if is_mask[path]}


def stage_uploads(files: list[str | Path], dest: Path) -> StagedUploads:
    """Checks every file first, then copies the photos into `dest` under safe names and each uploaded mask beside
    its photo (module docstring); nothing is copied on error."""
    if not files:
        raise UploadError("upload at least one photo of the subject")
    if len(files) > MAX_UPLOAD_FILES:
        raise UploadError(f"{len(files)} files is more than the {MAX_UPLOAD_FILES} accepted at once")
    photos, masks = pair_masks([Path(f) for f in files])
    checked = {path: check_image(path) for path in [*photos, *masks.values()]}  # a mask is read as an image too
    staged = StagedUploads(dest, [])
    for i, src in enumerate(photos):
        # Our own names: an uploaded name never becomes a path component.
        target = _copy(src, dest / f"photo_{i:03d}{PHOTO_FORMATS[checked[src].format]}")
        staged.photos.append((src.name, dataclasses.replace(checked[src], path=target)))
        if i in masks:
            mask = masks[i]
            target = _copy(mask, dest / f"photo_{i:03d}{MASK_SUFFIX}{PHOTO_FORMATS[checked[mask].format]}")
            staged.masks.append((mask.name, target))
    return staged


def _copy(src: Path, target: Path) -> Path:
    return atomic_write(target, lambda tmp: shutil.copyfile(src, tmp), src.stat().st_size)


def check_photo_masks(folder: Path, instance_prompt: str, uploaded_names: dict[str, str] | None = None) -> None:
    """The masked loss's check (data/masks.py `check_masks`) on the photos the trainer will read from `folder`,
    before the job starts: UploadError in one line naming each photo without a mask (or a bad mask) by the name
    the user knows (`uploaded_names`: staged name -> uploaded name)."""
    try:
        check_masks(scan_photos(folder, instance_prompt).records)
    except DatasetError as err:
        message = str(err).replace(f"{folder}{os.sep}", "").replace("--masked_loss", "masked loss")
        for staged, uploaded in (uploaded_names or {}).items():
            message = message.replace(staged, uploaded)
        if uploaded_names:
            message = message.replace("put a <name>_mask.png beside", "upload a <name>_mask.png with")
        raise UploadError(message) from None


def photo_folders(roots: AllowedRoots) -> dict[str, Path]:
    """Label -> folder for every given photo root and its immediate subfolders that hold a photo (by content)."""
    found = {}
    for root in roots.roots:
        if not root.is_dir():
            continue
        for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
            if any(p.is_file() and not p.name.startswith(".") and identify_photo(p) for p in folder.iterdir()):
                label = root.name if folder == root else f"{root.name}/{folder.name}"
                found[label] = folder
    return found


def check_photo_folder(folder: str | Path, roots: AllowedRoots) -> tuple[Path, FolderPhotos]:
    """A folder of photos inside the allowed roots, every file checked as the trainer will; the photos and the
    skipped files (with reasons) come back for the user to see. UploadError when no photo is usable."""
    resolved = roots.check(folder)
    if not resolved.is_dir():
        raise UploadError(f"{folder}: not a folder")
    found = find_photos(resolved)
    if not found.photos:
        why = "; ".join(f"{s.path.name}: {s.reason}" for s in found.skipped[:3])
        raise UploadError(f"{resolved.name}: no usable photos in this folder" + (f" ({why})" if why else ""))
    return resolved, found


def photo_notes(named: list[tuple[str, PhotoInfo]], resolution: int | None) -> list[str]:
    """One line per thing the user should know about the photos used (downscaled, first frame, small)."""
    return [f"{name}: {note}" for name, info in named for note in info.notes(resolution)]
