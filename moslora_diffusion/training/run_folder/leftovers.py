"""What --overwrite_output_dir deletes inside the folders a run shares with its user (run_folder/outputs.py
deletes the rest of an earlier run's entries whole): in validation/ only the images a validation wrote, in the
logging folder only the trackers' event files. Users keep their own picks and notes beside them."""

from __future__ import annotations

import re
from pathlib import Path

from ...files.atomic import TEMP_NAME

# The names of the images a validation writes into validation/ (outputs.validation_image_name).
_VALIDATION_IMAGE = re.compile(r"^step-\d{6,}-\d+\.png$")
_TRACKER_FILE = re.compile(r"events\.out\.tfevents\..+")  # tensorboard's event files (the trackers' logs)


def remove_tracker_logs(folder: Path) -> bool:
    """Deletes the tracker files a run wrote under the logging folder (tensorboard's event files, in the project's
    and hparams' subfolders) and the folders left empty; anything else is the user's and stays. True when the
    folder was left empty and removed."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # the deepest first
        if path.is_symlink():
            continue
        if path.is_file() and _TRACKER_FILE.match(path.name):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if any(folder.iterdir()):
        return False
    folder.rmdir()
    return True


def remove_validation_images(folder: Path) -> bool:
    """Deletes the validation images a run wrote into `folder` (and their temporaries); anything else there is the
    user's (a favourite saved beside them) and stays. True when the folder was left empty and removed."""
    for path in folder.iterdir():
        temp = TEMP_NAME.match(path.name)
        name = temp.group("name") if temp else path.name
        if path.is_file() and not path.is_symlink() and _VALIDATION_IMAGE.match(name):
            path.unlink()
    if any(folder.iterdir()):
        return False
    folder.rmdir()
    return True
