"""Subject photos from the browser or from a folder the app was given, checked before any use.

An upload is judged by its content (PIL must recognise and fully decode it), not by its name, and
bounded in bytes and in pixels so a small file cannot unpack into a huge image.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .paths import AllowedRoots

MAX_UPLOAD_BYTES = 25 * 2**20
MAX_PIXELS = 40_000_000  # about 7700 x 5200: bigger than any camera photo people train on
MAX_UPLOAD_FILES = 100
IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "MPO": ".jpg", "TIFF": ".tif"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class UploadError(ValueError):
    """A file that is not an acceptable photo; the message names it."""


def check_image(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> str:
    """The image format of `path` if it is a decodable photo within bounds; raises UploadError otherwise."""
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt, (width, height) = image.format, image.size
                if width * height > max_pixels:
                    raise UploadError(f"{name}: {width}x{height} is over the {max_pixels:,} pixel limit")
                if fmt not in IMAGE_FORMATS:
                    raise UploadError(f"{name}: {fmt} images are not accepted; use JPEG, PNG, WebP, BMP or TIFF")
                image.load()  # decodes every pixel: a truncated or corrupt file fails here, not in training
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        # The error text names the server's temporary path: the type says enough.
        raise UploadError(f"{name}: not a readable image ({type(err).__name__})") from None
    return fmt


def stage_uploads(files: list[str | Path], dest: Path) -> list[Path]:
    """Checks every file first, then copies them into `dest` under safe names; nothing is copied on error."""
    if not files:
        raise UploadError("upload at least one photo of the subject")
    if len(files) > MAX_UPLOAD_FILES:
        raise UploadError(f"{len(files)} files is more than the {MAX_UPLOAD_FILES} accepted at once")
    formats = [check_image(f) for f in files]
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (src, fmt) in enumerate(zip(files, formats, strict=True)):
        # Our own names: an uploaded name never becomes a path component.
        target = dest / f"photo_{i:03d}{IMAGE_FORMATS[fmt]}"
        shutil.copyfile(src, target)
        written.append(target)
    return written


def photo_folders(roots: AllowedRoots) -> dict[str, Path]:
    """Label -> folder for every given photo root and its immediate subfolders that hold images."""
    found = {}
    for root in roots.roots:
        if not root.is_dir():
            continue
        for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
            if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
                label = root.name if folder == root else f"{root.name}/{folder.name}"
                found[label] = folder
    return found


def check_photo_folder(folder: str | Path, roots: AllowedRoots) -> Path:
    """A folder of photos inside the allowed roots, with every image in it checked."""
    resolved = roots.check(folder)
    if not resolved.is_dir():
        raise UploadError(f"{folder}: not a folder")
    images = [p for p in sorted(resolved.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise UploadError(f"{resolved.name}: no photos (JPEG, PNG, WebP, BMP or TIFF) in this folder")
    for image in images:
        check_image(image)
    return resolved
