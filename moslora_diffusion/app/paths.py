"""Which files the app may read: only inside the folders it was given, and adapters only as safetensors.

Every user-supplied path is resolved (symlinks and `..` included) before the check, so a path that
names a file outside the allowed roots through traversal or a link is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files.safetensors_io import PICKLE_SUFFIXES, pickle_refusal

ADAPTER_FILE_NAME = "moslora.safetensors"  # what a training output folder holds
MOLE_FILE_NAME = "mole.safetensors"  # what a gate-training folder holds


class PathNotAllowedError(ValueError):
    """A path outside the app's folders, or not a safetensors file."""


@dataclass
class AllowedRoots:
    """Folders (and single files) the app may read from."""

    roots: list[Path] = field(default_factory=list)

    def add(self, path: str | Path) -> Path:
        resolved = Path(path).expanduser().resolve()
        if resolved not in self.roots:
            self.roots.append(resolved)
        return resolved

    def check(self, path: str | Path) -> Path:
        """The resolved path if it lies inside (or is) one of the roots; raises otherwise."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise PathNotAllowedError(f"{path}: outside the folders this app was given; refusing to read it")
        return resolved


def adapter_file(path: str | Path, roots: AllowedRoots) -> Path:
    """The adapter file a path names (a training folder means its moslora.safetensors), checked."""
    resolved = roots.check(path)
    if resolved.is_dir():
        if (resolved / MOLE_FILE_NAME).is_file() and not (resolved / ADAPTER_FILE_NAME).is_file():
            raise PathNotAllowedError(f"{path} holds a MoLE (mole.safetensors), not an adapter: load it with "
                                      f"--mole (app.py), or `python -m moslora_diffusion.mole generate --mole {path}`")
        resolved = roots.check(resolved / ADAPTER_FILE_NAME)
    if resolved.suffix.lower() in PICKLE_SUFFIXES:
        raise PathNotAllowedError(pickle_refusal(Path(path)))
    if resolved.suffix.lower() != ".safetensors":
        raise PathNotAllowedError(f"{path}: adapters are read only as .safetensors files")
    if not resolved.is_file():
        raise PathNotAllowedError(f"{path}: no adapter file there (expected {ADAPTER_FILE_NAME} or a .safetensors)")
    return resolved


def adapter_name(path: Path, file_name: str = ADAPTER_FILE_NAME) -> str:
    """A training folder's file (`file_name`) is named after the folder; any other file after its stem."""
    return path.parent.name if path.name == file_name else path.stem


def discover_adapters(roots: AllowedRoots, file_name: str = ADAPTER_FILE_NAME) -> dict[str, Path]:
    """name -> file for every root .safetensors file, every root's `file_name` and its subfolders' (adapters:
    moslora.safetensors; MoLE compositions: mole.safetensors)."""
    found: dict[str, Path] = {}
    for root in roots.roots:
        if root.is_file():
            candidates = [root] if root.suffix.lower() == ".safetensors" else []
        elif root.is_dir():
            candidates = [root / file_name] + sorted(root.glob(f"*/{file_name}"))
        else:
            candidates = []
        for candidate in candidates:
            if not candidate.is_file():
                continue
            try:
                resolved = roots.check(candidate)  # a link out of the root is skipped, not followed
            except PathNotAllowedError:
                continue
            if resolved not in found.values():
                found[unique_name(adapter_name(candidate, file_name), found)] = resolved
    return found


def unique_name(name: str, taken) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"
