"""Run identity: whether an output folder holds the run that a new command describes.

Settings are compared by what they mean, not by how they were typed. Paths are compared resolved
(`runs/dog`, `runs/dog/` and `/home/me/runs/dog` are one folder); a photo or class folder that was moved
still matches when it holds the same files (relative names and bytes). Where the run's own folder lives is
no part of what the run is (`output_dir` is a RUN_CONTROL_FIELDS entry), so a moved run folder resumes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Settings that name a file, folder or hub id.
PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "single_file_config",
                 "instance_data_dir", "class_data_dir")
# Of those, the folders small enough to recognise by their content (a few to a few hundred images).
FOLDER_SETTINGS = ("instance_data_dir", "class_data_dir")


def resolve_path_setting(value: str | None) -> str | None:
    """An existing local path as its absolute, resolved form; anything else (a hub id, None) unchanged."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def folder_fingerprint(value: str | None) -> str | None:
    """sha256 over the folder's visible files (relative name and bytes, in name order); None if not a folder."""
    folder = Path(value).expanduser() if value else None
    if folder is None or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            with open(path, "rb") as f:
                content = hashlib.file_digest(f, "sha256").digest()
            digest.update(relative.as_posix().encode() + b"\0" + content)
    return digest.hexdigest()


def input_record(config) -> dict:
    """{setting: {"path": resolved, "files": fingerprint | None}}, kept in training_config.json as "inputs"."""
    return {name: {"path": resolve_path_setting(getattr(config, name)),
                   "files": folder_fingerprint(getattr(config, name)) if name in FOLDER_SETTINGS else None}
            for name in PATH_SETTINGS}


def stored_path(name: str, stored_value, stored_input: dict | None):
    """The stored setting as the run saw it: its recorded resolved path, else (a record written before
    "inputs" existed) the stored text resolved against today's working folder."""
    if name not in PATH_SETTINGS:
        return stored_value
    return (stored_input or {}).get("path") or resolve_path_setting(stored_value)


def same_setting(name: str, stored_value, stored_input: dict | None, value) -> bool:
    """Whether a stored run-defining setting and this run's value mean the same thing. A list setting (MoLE's
    --experts and --expert_data_dirs) matches element by element, each path compared resolved."""
    if isinstance(value, tuple):
        return (isinstance(stored_value, list | tuple) and len(stored_value) == len(value)
                and all(resolve_path_setting(a) == resolve_path_setting(b)
                        for a, b in zip(stored_value, value, strict=True)))
    if name not in PATH_SETTINGS:
        return stored_value == value
    if stored_path(name, stored_value, stored_input) == resolve_path_setting(value):
        return True
    files = (stored_input or {}).get("files")
    return bool(files) and name in FOLDER_SETTINGS and folder_fingerprint(value) == files
