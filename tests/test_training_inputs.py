"""Bad input: a clear error before any training starts, and nothing in the output folder clobbered.
Also the command line and config files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
from training_helpers import (
    PROMPT,
    REPO,
    cli_env,
    make_photos,
     # noqa: F401 (autouse fixture)
    run_training,
    snapshot,
    tiny_config,
)

from moslora_diffusion.data import DatasetError
from moslora_diffusion.training import CheckpointError, ConfigError, OutputDirError, parse_args


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    return path


@pytest.mark.parametrize(("make_folder", "message"), [
    (lambda p: p, "does not exist"),
    (lambda p: p.mkdir() or p, "no image files"),
    (lambda p: _corrupt(p / "a.jpg").parent, r"no readable photo in .* \(1 skipped: a.jpg: not an image Pillow"),
])
def test_unusable_photo_folder_fails_before_loading_anything(tiny_sd15_dir, tmp_path, make_folder, message):
    photos = make_folder(tmp_path / "photos")
    config = tiny_config(tiny_sd15_dir, photos, tmp_path / "out")
    skipped = pytest.warns(UserWarning, match="a.jpg") if "none" in message else nullcontext()
    with pytest.raises(DatasetError, match=message), skipped:
        run_training(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"instance_prompt": None}, "--instance_prompt is required"),
    ({"instance_prompt": "  "}, "--instance_prompt is required"),
    ({"with_prior_preservation": True, "class_data_dir": "c"}, "needs --class_prompt"),
    ({"with_prior_preservation": True, "class_prompt": "a dog", "prior_source": "class_images"},
     "needs --class_data_dir"),
    ({"with_prior_preservation": True, "prior_source": "base_model"}, "needs --class_prompt"),
    ({"with_prior_preservation": True, "prior_source": "images", "class_prompt": "a dog"}, "--prior_source must be"),
    ({"rank": 0}, "--rank must be > 0"),
    ({"resolution": 33}, "multiple of 8"),
    ({"optimizer": "sgd"}, "--optimizer must be one of"),
    ({"target_modules": " , "}, "no target modules"),
    ({"overwrite_output_dir": True, "resume_from_checkpoint": "latest"}, "pass one of them"),
])
def test_bad_settings_are_refused_on_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(Path("m"), tmp_path, tmp_path / "out", **overrides)


@pytest.mark.parametrize(("optimizer", "package"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_missing_optional_optimizer_names_the_pip_install(tiny_sd15_dir, tmp_path, monkeypatch, optimizer,
                                                          package):
    real_find_spec = importlib.util.find_spec  # make the package absent even where it is installed
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real_find_spec(name, *args))
    config = tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos"), tmp_path / "out", optimizer=optimizer)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        run_training(config)
    assert not (tmp_path / "out").exists()


def test_command_line_reports_a_missing_prompt_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"), "--pretrained_model_name_or_path", "m",
                           "--instance_data_dir", str(tmp_path)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: --instance_prompt is required" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_flag_with_its_help_text():
    """argparse %-formats help texts: a "30%" in one once made `--help` crash with a TypeError."""
    from dataclasses import fields

    from moslora_diffusion.training.settings.config import TrainConfig, build_parser

    text = " ".join(build_parser().format_help().split())  # unwrapped
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert "measured 5-30% faster steps" in text


def test_config_file_holds_any_flag_and_the_command_line_wins(tmp_path):
    (tmp_path / "run.yaml").write_text("pretrained_model_name_or_path: m\ninstance_data_dir: d\n"
                                       f"instance_prompt: {PROMPT}\nrank: 8\nlearning_rate: 1e-4\ncenter_crop: true\n")
    config = parse_args(["--config", str(tmp_path / "run.yaml"), "--rank", "16", "--no-center_crop"])
    assert (config.rank, config.learning_rate, config.center_crop, config.instance_prompt) == (16, 1e-4, False, PROMPT)
    (tmp_path / "run.toml").write_text('pretrained_model_name_or_path = "m"\ninstance_data_dir = "d"\n'
                                       'instance_prompt = "p"\nlora_alpha = 8\nwith_prior_preservation = false\n')
    assert parse_args(["--config", str(tmp_path / "run.toml")]).lora_alpha == 8.0
    (tmp_path / "typo.yaml").write_text("learning_rat: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_args(["--config", str(tmp_path / "typo.yaml")])
    (tmp_path / "wrong.yaml").write_text("pretrained_model_name_or_path: m\ninstance_data_dir: d\n"
                                         "instance_prompt: p\nrank: four\n")
    with pytest.raises(ConfigError, match="rank is 'four'; give a whole number"):  # was argparse's "--rank"
        parse_args(["--config", str(tmp_path / "wrong.yaml")])


def test_output_folder_of_a_different_run_is_left_alone(tiny_sd15_dir, tmp_path):
    photos = make_photos(tmp_path / "photos")
    first = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1)
    run_training(first)
    before = snapshot(tmp_path / "out")

    other = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1, rank=8)
    with pytest.raises(OutputDirError, match=r"different run \(rank: 4 -> 8\)"):
        run_training(other)
    assert snapshot(tmp_path / "out") == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    with pytest.raises(OutputDirError, match="notes.txt"):
        run_training(tiny_config(tiny_sd15_dir, photos, foreign))
    assert snapshot(foreign) == {"notes.txt": b"my notes"}

    replaced = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1, rank=8,
                                        overwrite_output_dir=True))
    assert json.loads((replaced.output_dir / "training_config.json").read_text())["config"]["rank"] == 8


def test_a_run_recorded_before_a_setting_existed_still_resumes(tiny_sd15_dir, tmp_path):
    """A run started with an older version has no entry for a newer setting: that entry counts as its default."""
    photos = make_photos(tmp_path / "photos")
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1, checkpointing_steps=1))
    record_path = tmp_path / "out" / "training_config.json"
    record = json.loads(record_path.read_text())
    del record["config"]["fp8_base"]
    record_path.write_text(json.dumps(record))
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=2,
                                       checkpointing_steps=1, resume_from_checkpoint="latest"))
    assert (resumed.resumed_from, resumed.steps) == (1, 2)


def test_resuming_from_a_checkpoint_of_another_family_is_refused(tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    photos = make_photos(tmp_path / "photos")
    run_training(tiny_config(tiny_sdxl_dir, photos, tmp_path / "xl", max_train_steps=1, checkpointing_steps=1))
    sd1 = tiny_config(tiny_sd15_dir, photos, tmp_path / "sd1",
                      resume_from_checkpoint=str(tmp_path / "xl" / "checkpoint-1"))
    with pytest.raises(CheckpointError, match="trained on a sdxl model, but this run uses a sd1 model"):
        run_training(sd1)
    assert not (tmp_path / "sd1").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "sd1",
                                 resume_from_checkpoint=str(tmp_path / "nowhere")))
    assert not (tmp_path / "sd1").exists()


@pytest.mark.parametrize("extra, note", [
    (["--adapter", "lora", "--mixer_init", "orthogonal"], "Note: --mixer_init has no effect in this run (--adapter "
     "lora has no mixer)"),
    (["--class_prompt", "a photo of a dog", "--num_class_images", "5"], "Note: --class_prompt, --num_class_images "
     "have no effect in this run (used only with --with_prior_preservation)"),
    (["--class_prompt", "a photo of a dog"], "Note: --class_prompt has no effect in this run (used only with "
     "--with_prior_preservation)"),  # it said "they act" of one flag
    (["--validation_steps", "50"], "Note: --validation_steps has no effect in this run (used only with "
     "--validation_prompt or --validation_loss_photos)"),
])
def test_a_flag_that_this_run_will_not_use_is_named_in_one_line(tmp_path, capsys, extra, note):
    """These flags were accepted and silently ignored: a user believed the run used them."""
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "a photo of sks dog"]
    parse_args([*base, *extra])
    printed = capsys.readouterr().out.splitlines()
    assert printed.count(note) == 1, printed
    parse_args([*base, "--mixer_init", "orthogonal", "--validation_prompt", "sks dog", "--validation_steps", "5",
                "--with_prior_preservation", "--class_prompt", "a dog", "--class_data_dir", str(tmp_path.parent / "c")])
    assert "Note:" not in capsys.readouterr().out  # the same flags where they act: nothing to say


def test_the_default_output_folder_is_named_when_no_output_dir_is_given(tmp_path, capsys, monkeypatch):
    """Without --output_dir the run's files went to ./moslora-dreambooth-model (./mole-gates for gates), a folder
    the command line never named."""
    from moslora_diffusion.mole.gate_config import parse_gate_args

    monkeypatch.chdir(tmp_path)
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "a photo of sks dog"]
    parse_args(base)
    assert f"Output: {tmp_path / 'moslora-dreambooth-model'} (--output_dir's default; give --output_dir to " \
           "choose the folder)" in capsys.readouterr().out.splitlines()
    parse_args([*base, "--output_dir", "mine"])
    assert "Output:" not in capsys.readouterr().out
    parse_gate_args(["--pretrained_model_name_or_path", "m", "--experts", "a", "b"])
    assert f"Output: {tmp_path / 'mole-gates'}" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("rank: abc", "--config {file}: rank is 'abc'; give a whole number"),  # was "argument --rank: invalid int"
    ("rank: 2.5", "--config {file}: rank is 2.5; give a whole number"),
    ("learning_rate: fast", "--config {file}: learning_rate is 'fast'; give a number"),
    ("center_crop: maybe", "--config {file}: center_crop is 'maybe'; give true or false"),
    ("rank: -3", "--rank must be > 0, got -3 (--rank: set in --config {file})"),  # the flag was never typed
])
def test_a_bad_value_in_a_config_file_names_the_file(tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrained_model_name_or_path: m\ninstance_data_dir: d\ninstance_prompt: {PROMPT}\n{line}\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(config)])
    assert str(err.value) == message.format(file=config)
