"""The app's Train tab opens on the base model's preset, and the command it starts applies that preset under the
boxes' values (what the user changed wins, what they turned off stays off)."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import tiny_app_state

from moslora_diffusion.app.state import AppState, load_base_pipeline
from moslora_diffusion.app.training_jobs import TrainingError, TrainingSettings, build_command
from moslora_diffusion.app.ui import build_ui
from moslora_diffusion.training.settings.config import parse_args

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "assets" / "toy-base"


def train_tab_values(state) -> dict:
    """elem_id -> value of the Train tab's boxes, as the page opens."""
    demo = build_ui(state)
    return {block.elem_id: block.value for block in demo.blocks.values()
            if (getattr(block, "elem_id", None) or "").startswith(("train-", "class-prompt", "instance-prompt"))}


@pytest.mark.skipif(not (TOY_BASE / "model_index.json").is_file(), reason="the toy base model is not in this copy")
def test_the_train_tab_opens_on_the_toy_bases_preset(tmp_path_factory):
    state = AppState(load_base_pipeline(TOY_BASE, device="cpu"), TOY_BASE, tmp_path_factory.mktemp("out"))
    assert state.matching_preset == "toy-subject"
    values = train_tab_values(state)
    assert values["train-preset"] == "toy-subject"
    assert (values["train-rank"], values["train-steps"], values["train-resolution"]) == (16, 600, 64)
    assert (values["instance-prompt"], values["class-prompt"]) == ("a photo of sks star", "a photo of a star")
    assert values["train-pivotal"] is True and values["train-trigger-word"] == "sks"
    assert values["train-prior-source"].startswith("base model")


@pytest.mark.parametrize(("family", "preset"), [("sd15", "sd15-subject"), ("sdxl", "sdxl-subject")])
def test_other_bases_open_on_their_familys_preset(family, preset, tiny_dirs, tmp_path_factory):
    state, _ = tiny_app_state(tiny_dirs[family], tmp_path_factory)
    values = train_tab_values(state)
    assert values["train-preset"] == preset and values["train-rank"] == 16 and values["train-steps"] == 500
    assert values["class-prompt"] == "a photo of a dog"  # the preset's prior preservation is on


def test_the_apps_command_applies_the_preset_under_the_boxes(tmp_path):
    settings = TrainingSettings(tmp_path / "photos", "a photo of sks star", "a photo of a star", steps=50, rank=8,
                                resolution=64, validation_steps=0, prior_source="base_model", pivotal=True,
                                trigger_word="sks", preset="toy-subject")
    settings.check()
    config = parse_args(build_command(str(TOY_BASE), settings, tmp_path / "run")[2:])
    assert (config.preset, config.rank, config.max_train_steps) == ("toy-subject", 8, 50)  # the boxes win
    assert (config.learning_rate, config.target_modules, config.lr_warmup_steps) == (3e-3, "all", 20)  # the preset's
    assert config.with_prior_preservation and config.resolved_prior_source == "base_model"
    assert config.train_text_encoder_ti and config.token_abstraction == "sks"
    # Boxes left empty or unticked turn off what the preset turns on.
    off = TrainingSettings(tmp_path / "photos", "a photo of sks star", "", steps=50, rank=16, validation_steps=0,
                           preset="toy-subject")
    off.check()
    config = parse_args(build_command(str(TOY_BASE), off, tmp_path / "run")[2:])
    assert not config.with_prior_preservation and not config.train_text_encoder_ti and config.token_abstraction is None


def test_an_unknown_preset_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(TrainingError, match="unknown preset 'sdxl-8gb'; choose one of"):
        TrainingSettings(tmp_path, "a photo of sks dog", preset="sdxl-8gb").check()
