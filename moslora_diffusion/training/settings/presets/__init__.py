"""Presets: named starting points for `train_dreambooth.py --preset NAME` (and the app's Train tab).

Each preset is a small TOML file in this folder, one flag per line with its source as a comment; copy one and
edit it to make your own (`--config my.toml` reads the same format). Order of precedence: flags on the command
line, then a `--config` file, then the preset, then the trainer's defaults. The run's training_config.json
records the preset's name and every resolved value.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..flags import ConfigError, load_config_file

FOLDER = Path(__file__).resolve().parent
# The preset the app's Train tab opens on, per model family (models/families.py names); the toy base has its own.
FAMILY_PRESETS = {"sd1": "sd15-subject", "sd2": "sd15-subject", "sdxl": "sdxl-subject"}
TOY_PRESET = "toy-subject"
TOY_RECORD = "toy_pretrain.json"  # what toy/pretrain.py writes into a toy base model's folder


def preset_names() -> list[str]:
    """Every preset shipped in this folder, sorted."""
    return sorted(path.stem for path in FOLDER.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The TOML file of preset `name`; ConfigError (one line, with the known names) for an unknown one."""
    path = FOLDER / f"{name}.toml"
    if not name or "/" in name or "\\" in name or not path.is_file():
        names = preset_names()
        hint = difflib.get_close_matches(name or "", names, n=1)
        raise ConfigError(f"--preset {name!r} is not a preset" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; choose one of {', '.join(names)}")
    return path


def load_preset(name: str, cls: type) -> dict:
    """{flag: value} of preset `name`, checked against the flags of `cls` like a --config file."""
    values = load_config_file(preset_path(name), cls)
    if "preset" in values:
        raise ConfigError(f"preset {name}: a preset cannot name another preset")
    return values


def preset_for_model(base: str | Path, family: str) -> str | None:
    """The preset that matches a base model (`family`: models/families.py's name): the toy base's own (a folder
    with the toy pretraining record), else the family's; None when none fits."""
    return TOY_PRESET if (Path(base) / TOY_RECORD).is_file() else FAMILY_PRESETS.get(family)


def preset_settings(name: str | None) -> dict:
    """What the app's Train tab shows for preset `name` ("" or None: none): steps, rank, resolution (None: the
    model's), prior preservation and its source, pivotal tuning and its word, masked loss (a preset without a
    value: the defaults)."""
    from ..config import TrainConfig  # config.py imports this module

    values = load_preset(name, TrainConfig) if name else {}
    prior = values.get("prior_source", "auto")
    return {"steps": values.get("max_train_steps", 400), "rank": values.get("rank", 4),
            "resolution": values.get("resolution"),
            "prior_source": "base_model" if prior in ("auto", "base_model") and name else "class_images",
            "pivotal": bool(values.get("train_text_encoder_ti", False)),
            "trigger_word": values.get("token_abstraction") or "", "masked_loss": bool(values.get("masked_loss")),
            "prior": bool(values.get("with_prior_preservation"))}
