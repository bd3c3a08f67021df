"""Subject photos from the browser or from a folder the app was given, checked before any use.

A photo is judged exactly as the trainer judges it (data/images.py, `inspect_photo`): by its content, not its
name, fully decoded, at most MAX_PIXELS (read from the header before decoding), and downscaled on load above
WORKING_PIXELS, which the user is told. Uploads are also bounded in bytes and in number.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..data.images import PHOTO_FORMATS, ImageError, PhotoInfo, identify_photo, inspect_photo
from ..data.scan import FolderPhotos, find_photos
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


def stage_uploads(files: list[str | Path], dest: Path) -> list[tuple[str, PhotoInfo]]:
    """Checks every file first, then copies them into `dest` under safe names; nothing is copied on error.

    Returns (uploaded name, the staged copy's PhotoInfo) per file, in order.
    """
    if not files:
        raise UploadError("upload at least one photo of the subject")
    if len(files) > MAX_UPLOAD_FILES:
        raise UploadError(f"{len(files)} files is more than the {MAX_UPLOAD_FILES} accepted at once")
    checked = [check_image(f) for f in files]
    staged = []
    for i, (src, info) in enumerate(zip(files, checked, strict=True)):
        # Our own names: an uploaded name never becomes a path component.
        target = dest / f"photo_{i:03d}{PHOTO_FORMATS[info.format]}"
        atomic_write(target, lambda tmp, src=src: shutil.copyfile(src, tmp), Path(src).stat().st_size)
        staged.append((Path(src).name, dataclasses.replace(info, path=target)))
    return staged


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
