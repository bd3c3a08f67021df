"""The manifest of a run folder: every top-level file and folder a run of ours wrote into its output folder.

`--overwrite_output_dir` deletes exactly the entries the manifest lists, so a user's own `README.md` or
`logs/` in a folder that never held a run can never be taken for ours. A name is recorded *before* it is
first written: a kill in between leaves a listed name that does not exist (harmless), never a file of ours
that looks foreign. The manifest itself is replaced atomically on every change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...files.atomic import atomic_write

MANIFEST_FILE = ".moslora_run.json"
FORMAT_VERSION = 1
# checkpoints.save_checkpoint writes checkpoint-N.tmp and swaps an old checkpoint-N aside as checkpoint-N.old.
_CHECKPOINT_SIBLING = re.compile(r"^(checkpoint-\d+)\.(?:tmp|old)$")


def read_manifest(folder: str | Path) -> set[str] | None:
    """The names a run of ours recorded writing into `folder`; None where there is no readable manifest."""
    try:
        names = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))["written"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return set(names)


def write_manifest(folder: str | Path, names: set[str]) -> None:
    text = json.dumps({"format_version": FORMAT_VERSION, "written": sorted(names)}, indent=1)
    atomic_write(Path(folder) / MANIFEST_FILE, lambda p: p.write_text(text, encoding="utf-8"))


def record_written(folder: str | Path, *names: str) -> None:
    """Adds top-level `names` of `folder` to its manifest; call right before writing them."""
    listed = read_manifest(folder)
    if listed is None or not set(names) <= listed:
        write_manifest(folder, (listed or set()) | set(names))


def owns(name: str, listed: set[str]) -> bool:
    """Whether the entry `name` is a run's: listed, or the temporary sibling of a listed checkpoint."""
    sibling = _CHECKPOINT_SIBLING.match(name)
    return name in listed or bool(sibling and sibling.group(1) in listed)
