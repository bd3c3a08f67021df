"""Atomic writes: every file and folder the project writes appears whole under its name, or not at all.

A writer fills a temporary sibling (a hidden `.NAME.<pid>-<random>.tmp`) that is renamed into place, so an
error, a full disk or a kill never leaves a half-written file under the real name. A killed process can
leave its temporary behind; the next write into the same folder removes it (`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Room left free beyond what a write needs (headers, the file system): never fill the disk to the last byte.
FREE_SPACE_MARGIN = 64 * 2**20
# Our temporaries only: a dot, the target's name, the writer's pid (absent in names written before it was
# added), 8 random characters (mkstemp's alphabet or token_hex), `.tmp`, and `.old` for a folder moved aside.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.tmp(?:\.old)?$")
STALE_AFTER_S = 3600.0  # untouched this long, a temporary is abandoned even if its pid was reused
ORPHAN_AFTER_S = 60.0  # untouched this long with its writer gone: a grace for a writer on another host (NFS)


def nearest_existing(path: str | Path) -> Path:
    """`path` itself or its nearest existing parent: where a folder about to be created takes its space from."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(folder: str | Path, needed: int) -> None:
    """OSError unless the disk holding `folder` (or its nearest existing parent; nothing is created) has `needed`
    bytes free plus FREE_SPACE_MARGIN; the message names both and what to do."""
    where = nearest_existing(folder)
    free = shutil.disk_usage(where).free
    if needed + FREE_SPACE_MARGIN > free:
        mib = 2**20
        raise OSError(f"not enough free disk space in {where}: {free // mib} MiB free, and writing there needs "
                      f"{math.ceil(needed / mib)} MiB plus {FREE_SPACE_MARGIN // mib} MiB kept free (so the disk "
                      "never fills up); free some space or write somewhere else")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def _owner_is_gone(pid: str | None) -> bool:
    if pid is None or os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # alive but another user's / not a pid at all
        return False
    return False


def _last_touched(path: Path) -> float:
    """Newest modification time in `path` (a folder being filled changes inside, not at its top)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    continue
    return newest


def remove_stale_temporaries(folder: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Removes the temporaries a killed writer left in `folder`; returns what was removed.

    Only names of our own pattern (`TEMP_NAME`), and only when nothing in them changed for `max_age_s`, or for
    a minute when their writer is gone (its pid is in the name and no such process runs here). A writer keeps
    touching its temporary while it writes, so it is not removed under it. Any other file is left alone.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or int(match.group("pid") or -1) == os.getpid():
            continue
        path = Path(entry.path)
        try:
            age = now - _last_touched(path)
            stale = age > max_age_s or (age > ORPHAN_AFTER_S and _owner_is_gone(match.group("pid")))
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # another process removed or renamed it first
            continue
    return removed


def _prepare(folder: Path, needed_bytes: int) -> None:
    check_free_space(folder, needed_bytes)  # before creating anything: a refusal leaves no empty folder
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write to {folder}: permission denied")
    remove_stale_temporaries(folder)


def _filled_temp_file(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    """A complete, fsynced temporary in `folder` holding what write(tmp) wrote; removed on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; other users' UIs must be able to read it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _publish_new(tmp: Path, path: Path) -> None:
    """Renames tmp to path only if no file has that name: FileExistsError otherwise, even against a racing
    writer (a hard link is created atomically or not at all)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as err:  # a file system without hard links (FAT, some network shares): check, then rename
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write(path: str | Path, write, needed_bytes: int = 0, overwrite: bool = True) -> Path:
    """Calls write(tmp_path) then renames tmp_path to path; on any failure the target is untouched.

    overwrite=False: FileExistsError when `path` exists, checked again at the rename (never clobbers a file
    another writer created meanwhile). needed_bytes: refused up front when the disk has less free.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    _prepare(path.parent, needed_bytes)
    tmp = _filled_temp_file(path.parent, path.name, write)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_new_file(folder: str | Path, names: Iterable[str], write: Callable[[Path], None],
                   needed_bytes: int = 0) -> Path:
    """Writes once, then publishes under the first of `names` no file has yet (never overwrites; two
    concurrent writers never get the same name). Returns the path written."""
    folder = Path(folder)
    names = iter(names)
    first = next(names)
    _prepare(folder, needed_bytes)
    tmp = _filled_temp_file(folder, first, write)
    try:
        name = first
        while True:
            try:
                _publish_new(tmp, folder / name)
                return folder / name
            except FileExistsError:
                name = next(names, None)
                if name is None:
                    raise FileExistsError(f"every name offered for a new file in {folder} is taken") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_image(image, path: str | Path, image_format: str = "PNG", overwrite: bool = True, **params) -> Path:
    """A PIL image written atomically (`image.save(file, format=..., **params)`)."""
    def write(tmp: Path) -> None:
        image.save(tmp, format=image_format, **params)

    return atomic_write(path, write, _raw_bytes(image), overwrite)


def save_new_image(image, folder: str | Path, names: Iterable[str], image_format: str = "PNG", **params) -> Path:
    """A PIL image written atomically under the first free name of `names` (see write_new_file)."""
    return write_new_file(folder, names, lambda tmp: image.save(tmp, format=image_format, **params),
                          _raw_bytes(image))


def _raw_bytes(image) -> int:
    """About the most an encoded 8-bit image takes: its raw RGBA pixels (PNG and JPEG compress below that)."""
    width, height = getattr(image, "size", (0, 0))
    return width * height * 4


def _normalise_modes(folder: Path) -> None:
    """Gives every regular file under `folder` the mode a new file gets under the process umask (0o666 & ~umask)
    and every folder 0o777 & ~umask: safetensors' save_file (and mkstemp, mkdtemp) create 0600 / 0700, which
    would make a model on a shared folder unreadable to other users. Links are left alone (never followed)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o777 & ~mask) for d in dirs] + [(f, 0o666 & ~mask) for f in files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def foreign_files_message(out: Path, foreign: list[str]) -> str:
    """The one line for --overwrite onto an earlier export that holds `foreign` entries (names the export did not
    write): a folder export replaces its folder whole (write_folder_atomically), so they would go with it."""
    return (f"--out {out} is an earlier export holding files it did not write ({', '.join(foreign[:5])}); move them "
            "out first, or choose a new folder")


def write_folder_atomically(out: Path, write: Callable[[Path], None], needed_bytes: int, overwrite: bool) -> Path:
    """write(tmp) fills a temporary sibling folder that is then renamed to `out`. A folder being
    replaced is moved aside first and only deleted once the new one is in place. Every file in it gets the
    mode a new file gets under the umask (_normalise_modes), whatever library wrote it."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    _prepare(out.parent, needed_bytes)
    tmp = out.parent / f"{_temp_prefix(out.name)}{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 would make the model unreadable to anyone else (umask applies here)
    old = out.parent / f"{tmp.name}.old"
    try:
        write(tmp)
        _normalise_modes(tmp)
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


def check_output_folder(path: str | Path, flag: str, holds: str = "the images go to") -> Path:
    """Refuses, before anything is loaded, an output folder that names a file (or lies under one), or on a disk
    without FREE_SPACE_MARGIN free (check_free_space). `holds` finishes "names the folder ..." in the message."""
    path = Path(path).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is under {existing}, which is a file"
                raise NotADirectoryError(f"{flag} {path} {where}; {flag} names the folder {holds} "
                                         "(created if missing): choose another name")
            break
    check_free_space(path, 0)
    return path


def check_not_an_input(out: str | Path, inputs, flag: str) -> None:
    """ValueError when writing `out` would replace one of `inputs` (files or folders a command reads): `out` is
    the input, or a folder holding it (a folder export replaces its target whole). Nothing is touched."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if source == target or target in source.parents:
            raise ValueError(f"{flag} {out} would overwrite the input {given}; write the output somewhere else")
