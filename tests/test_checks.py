"""Number ranges (moslora_diffusion/checks): one Range type, one table per entry point, nan / inf always refused."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest

from moslora_diffusion.checks import SCALE, SCALE_MAX, SCALE_MIN, Range, number_problems
from moslora_diffusion.console import OneLineErrorParser
from moslora_diffusion.training import ConfigError, TrainConfig, parse_args
from moslora_diffusion.training.settings.config import NUMBER_RANGES

REQUIRED = dict(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="a photo of sks dog")


@pytest.mark.parametrize("rng, value, message", [
    (Range(0, open_lower=True), 0, "x must be > 0, got 0"),
    (Range(0, open_lower=True), float("inf"), "x must be a finite number > 0, got inf"),
    (Range(0), float("nan"), "x must be a finite number >= 0, got nan"),  # nan < 0 is False: a plain `if` passed it
    (Range(0), -1e-9, "x must be >= 0, got -1e-09"),
    (Range(0, 1, open_upper=True), 1.0, "x must be in [0, 1), got 1.0"),
    (Range(1, 150, integer=True), "ten", "x must be a whole number, got 'ten'"),
    (Range(1, 150, integer=True), 2.5, "x must be a whole number, got 2.5"),
    (Range(64, 2048, multiple_of=8), 100, "x must be a multiple of 8 between 64 and 2048, got 100"),
    (Range(0, 2**32 - 1), 2**40, "x must be between 0 and 4294967295, got 1099511627776"),
    (Range(0), True, "x must be a number, got True"),  # a bool is no number, although Python says it is an int
    (Range(0), None, "x must be a number, got None"),
    (SCALE, -1.01, "x must be between -1 and 2, got -1.01"),
])
def test_a_value_outside_its_range_is_named_with_the_range(rng, value, message):
    assert rng.problem("x", value) == message


@pytest.mark.parametrize("rng, value, clean", [
    (Range(1, 150, integer=True), "2", 2), (Range(1, 150, integer=True), 3.0, 3), (SCALE, SCALE_MIN, -1.0),
    (SCALE, SCALE_MAX, 2.0), (SCALE, " 0.5 ", 0.5), (Range(0, optional=True), None, None),
])
def test_values_on_the_bounds_and_numeric_text_are_allowed_and_cleaned(rng, value, clean):
    assert rng.problem("x", value) is None
    assert rng.clean(value) == clean and type(rng.clean(value)) is type(clean)


def test_every_problem_of_a_table_is_named():
    table = {"a": Range(0), "b": Range(1, 2), "c": Range(0, optional=True)}
    assert number_problems({"a": float("nan"), "b": 3, "c": None}, table, "--{}") == [
        "--a must be a finite number >= 0, got nan", "--b must be between 1 and 2, got 3"]


def _numeric_fields() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    found = {}
    for f in fields(TrainConfig):
        kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        if kinds & {int, float} and bool not in kinds:
            found[f.name] = next(iter(kinds))
    return found


def test_every_number_of_the_training_config_has_a_range():
    assert set(_numeric_fields()) == set(NUMBER_RANGES)


@pytest.mark.parametrize("name", sorted(n for n, t in _numeric_fields().items() if t is float))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_no_float_setting_takes_nan_or_inf(name, value):
    with pytest.raises(ConfigError, match=f"--{name} must be a finite number"):
        TrainConfig(**REQUIRED, **{name: value})


@pytest.mark.parametrize("name, value, message", [
    ("seed", -1, "--seed must be between 0 and 4294967295"),  # numpy refuses it, after the model had loaded
    ("adam_beta2", 1.0, "--adam_beta2 must be in [0, 1)"),
    ("noise_offset", -0.1, "--noise_offset must be >= 0"),
])
def test_integer_and_bounded_settings_are_refused_out_of_range(name, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**REQUIRED, **{name: value})


def test_all_problems_of_a_config_come_in_one_line():
    with pytest.raises(ConfigError) as err:
        TrainConfig(**REQUIRED, learning_rate=float("inf"), max_grad_norm=float("nan"))
    assert "\n" not in str(err.value)
    assert "--learning_rate must be a finite number > 0, got inf" in str(err.value)
    assert "--max_grad_norm must be a finite number >= 0, got nan" in str(err.value)


@pytest.mark.parametrize("name, text", [("run.yaml", "learning_rate: .inf\n"), ("run.toml", "learning_rate = nan\n"),
                                        ("run.yaml", "prior_loss_weight: .nan\n")])
def test_config_files_are_checked_like_flags(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match="must be a finite number"):
        parse_args(["--config", str(tmp_path / name), "--pretrained_model_name_or_path", "m", "--instance_data_dir",
                    "d", "--instance_prompt", "p"])


def test_command_line_errors_are_one_line(capsys):
    parser = OneLineErrorParser(prog="x")
    parser.add_argument("--rank", type=int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--rank", "four"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: argument --rank: invalid int value: 'four' (--help lists the options)\n"
