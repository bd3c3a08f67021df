"""Where prior preservation's class images go (--class_data_dir), checked before anything loads: a folder, or a
path one can be made at, and apart from every photo folder of the subject (compared resolved: `photos`, `photos/`
and `/home/me/photos` are one folder), where generated class_*.png would be read back as photos of the subject."""

from __future__ import annotations

from pathlib import Path

from ...files.atomic import nearest_existing
from .flags import ConfigError


def check_class_folder(class_data_dir: str, instance_data_dir: str | None) -> None:
    """ConfigError (one line) for a class folder that is a file or lies under one (mkdir failed after the model
    load with [Errno 17] / [Errno 20]), or that is the instance photo folder or lies inside it."""
    folder = Path(class_data_dir).expanduser().absolute()
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "" if existing == folder else f" lies under {existing}, which"
        raise ConfigError(f"--class_data_dir {class_data_dir}{where} is a file, not a folder: give a folder for "
                          "the class images (missing ones are generated there)")
    if instance_data_dir:
        check_class_folder_apart(class_data_dir, instance_data_dir, "the instance photo folder")


def check_class_folder_apart(class_data_dir: str, photos: str, what: str) -> None:
    """ConfigError when the class folder is `photos` (`what` names it: "the instance photo folder", an expert's
    photo folder) or lies inside it, paths compared resolved."""
    classes, folder = Path(class_data_dir).expanduser().resolve(), Path(photos).expanduser().resolve()
    if classes == folder:
        raise ConfigError(f"--class_data_dir is {what} ({photos}): generated class images would land among your "
                          "photos; give a folder of its own")
    if classes.is_relative_to(folder):
        raise ConfigError(f"--class_data_dir {class_data_dir} lies inside {what} {photos}: generated class images "
                          "would land among your photos; give a folder of its own, outside it")
