"""Presets (`--preset NAME`, training/settings/presets/*.toml): each loads, validates and trains; the precedence
of command line, config file, preset and defaults; the run's record names the preset; an optimizer's default
learning rate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from training_helpers import PROMPT, REPO, cli_env, make_photos, run_training

from moslora_diffusion.training import parse_args
from moslora_diffusion.training.settings.config import TrainConfig, preset_config
from moslora_diffusion.training.settings.flags import ConfigError
from moslora_diffusion.training.settings.presets import FOLDER, load_preset, preset_names

SHIPPED = ("sd15-subject", "sdxl-subject", "sdxl-subject-8gb", "toy-subject")
# Every preset on the tiny model of its family (toy-subject: the toy base is an SD 1.x model).
FAMILY = {"sd15-subject": "sd15", "sdxl-subject": "sdxl", "sdxl-subject-8gb": "sdxl", "toy-subject": "sd15"}
REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", PROMPT,
            "--class_prompt", "a photo of a dog"]


def test_the_shipped_presets_are_there_and_every_value_has_a_source():
    assert set(SHIPPED) <= set(preset_names())
    for name in preset_names():
        lines = (FOLDER / f"{name}.toml").read_text(encoding="utf-8").splitlines()
        settings = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        assert settings, name
        for i, line in enumerate(lines):  # a setting's source: a comment on its line or in the block above it
            if line in settings and "#" not in line:
                block = lines[max(0, i - 12):i]
                assert any(above.lstrip().startswith("#") for above in block), (name, line)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_preset_loads_validates_and_trains_two_steps(name, tiny_dirs, tmp_path):
    values = load_preset(name, TrainConfig)
    assert values and "learning_rate" in values and "rank" in values
    photos = make_photos(tmp_path / "photos", count=2, size=(64, 64))
    out = tmp_path / "out"
    config = parse_args(["--preset", name, "--pretrained_model_name_or_path", str(tiny_dirs[FAMILY[name]]),
                         "--instance_data_dir", str(photos), "--instance_prompt", PROMPT,
                         "--class_prompt", "a photo of a dog", "--output_dir", str(out), "--max_train_steps", "2",
                         "--report_to", "none", "--resolution", "32", "--checkpointing_steps", "1000"])
    for key, value in values.items():  # the preset's values, except what the command line gave
        if key not in ("max_train_steps", "resolution"):
            assert getattr(config, key) == value, key
    result = run_training(config)
    assert result.steps == 2
    record = json.loads((out / "training_config.json").read_text())["config"]
    assert record["preset"] == name
    assert record["rank"] == values["rank"] and record["learning_rate"] == values["learning_rate"]
    assert record["max_train_steps"] == 2  # the command line won over the preset's length


def test_command_line_beats_config_file_beats_preset_beats_defaults(tmp_path):
    preset = load_preset("toy-subject", TrainConfig)
    assert preset["rank"] != TrainConfig.__dataclass_fields__["rank"].default  # else the test proves nothing
    (tmp_path / "mine.toml").write_text('rank = 8\nlr_warmup_steps = 5\n', encoding="utf-8")
    only_preset = parse_args(["--preset", "toy-subject", *REQUIRED])
    with_file = parse_args(["--preset", "toy-subject", "--config", str(tmp_path / "mine.toml"), *REQUIRED])
    with_flag = parse_args(["--preset", "toy-subject", "--config", str(tmp_path / "mine.toml"), "--rank", "2",
                            *REQUIRED])
    no_preset = parse_args(REQUIRED)
    assert (only_preset.rank, with_file.rank, with_flag.rank, no_preset.rank) == (16, 8, 2, 4)
    assert (only_preset.lr_warmup_steps, with_file.lr_warmup_steps, with_flag.lr_warmup_steps) == (20, 5, 5)
    assert with_flag.learning_rate == preset["learning_rate"] == 3e-3  # untouched: still the preset's
    assert no_preset.learning_rate == 1e-4 and no_preset.preset is None
    # A boolean the preset turns on is turned off from the command line; what depended on it goes with it.
    off = parse_args(["--preset", "toy-subject", "--no-train_text_encoder_ti", *REQUIRED])
    assert (off.train_text_encoder_ti, off.token_abstraction) == (False, None)
    # A config file may name the preset itself.
    (tmp_path / "named.toml").write_text('preset = "toy-subject"\nrank = 8\n', encoding="utf-8")
    named = parse_args(["--config", str(tmp_path / "named.toml"), *REQUIRED])
    assert (named.preset, named.rank, named.learning_rate) == ("toy-subject", 8, 3e-3)


def test_python_form_of_a_preset_applies_its_values():
    config = preset_config("toy-subject", pretrained_model_name_or_path="m", instance_data_dir="d",
                           instance_prompt=PROMPT, class_prompt="a photo of a dog", rank=2)
    assert (config.preset, config.rank, config.learning_rate, config.target_modules) == ("toy-subject", 2, 3e-3, "all")


def test_an_optimizer_without_a_learning_rate_takes_its_own_default(capsys):
    prodigy = parse_args(["--optimizer", "prodigy", *REQUIRED])
    assert prodigy.learning_rate == 1.0
    lines = [line for line in capsys.readouterr().out.splitlines() if "prodigy" in line]
    assert len(lines) == 1 and "learning rate 1" in lines[0]
    # over a preset's AdamW rate too: that rate was for the preset's optimizer
    assert parse_args(["--preset", "sd15-subject", "--optimizer", "prodigy", *REQUIRED]).learning_rate == 1.0
    assert parse_args(["--optimizer", "prodigy", "--learning_rate", "0.5", *REQUIRED]).learning_rate == 0.5
    assert parse_args(["--optimizer=prodigy", "--learning_rat=0.5", *REQUIRED]).learning_rate == 0.5  # abbreviated
    assert parse_args(["--optimizer", "adamw8bit", *REQUIRED]).learning_rate == 1e-4
    assert parse_args(REQUIRED).learning_rate == 1e-4
    assert TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt=PROMPT,
                       optimizer="prodigy").learning_rate == 1.0


def test_an_error_about_a_preset_value_names_the_preset():
    with pytest.raises(ConfigError, match=r"needs --class_prompt.*set by --preset sd15-subject"):
        parse_args(["--preset", "sd15-subject", *REQUIRED[:-2]])


def test_a_bad_preset_name_is_one_line_before_anything_loads(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"), "--preset", "sdxl-8gb",
                           "--pretrained_model_name_or_path", str(tmp_path / "nothing"), "--instance_data_dir",
                           str(tmp_path), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--preset 'sdxl-8gb' is not a preset" in proc.stderr and "sdxl-subject-8gb" in proc.stderr
    assert not (tmp_path / "out").exists()
