"""Atomic writes: every file and folder the project writes appears whole under its name, or not at all.

A writer fills a temporary sibling (a hidden `.NAME.*.tmp`) that is renamed into place, so an error,
a full disk or a kill never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Room left free beyond what a write needs (headers, the file system): never fill the disk to the last byte.
FREE_SPACE_MARGIN = 64 * 2**20


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + FREE_SPACE_MARGIN > free:
        raise OSError(f"not enough free disk space in {folder}: need {needed / 2**20:.0f} MiB, "
                      f"{free / 2**20:.0f} MiB free")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write, needed_bytes: int = 0, overwrite: bool = True) -> Path:
    """Calls write(tmp_path) then renames tmp_path to path; on any failure the target is untouched."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write to {folder}: permission denied")
    check_free_space(folder, needed_bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; other users' UIs must be able to read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(out: Path, write: Callable[[Path], None], needed_bytes: int, overwrite: bool) -> Path:
    """write(tmp) fills a temporary sibling folder that is then renamed to `out`. A folder being
    replaced is moved aside first and only deleted once the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    check_free_space(out.parent, needed_bytes)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 would make the model unreadable to anyone else (umask applies here)
    old = out.parent / f"{tmp.name}.old"
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
