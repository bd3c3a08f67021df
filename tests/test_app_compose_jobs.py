"""The Compose tab's long jobs without a browser: gate training as a Train-tab job (the trainer accepts the app's
command; a real 2-step run is picked up), and the static MoLE export (mask and scales reach the file exactly;
the app's pipeline is left as it was)."""

from __future__ import annotations

import time

import pytest
import torch
from app_helpers import tiny_app_state
from mole_helpers import make_experts, same_state
from mole_helpers import state as weights_of
from PIL import Image
from test_app_compose import write_mole
from training_helpers import make_photos

from moslora_diffusion.app.compose import generate_composed
from moslora_diffusion.app.exporting import AppExportError, export_mole
from moslora_diffusion.app.gate_jobs import (
    GateSettings,
    build_gate_command,
    expert_defaults,
    register_finished_gates,
    start_gate_training,
)
from moslora_diffusion.app.paths import PathNotAllowedError
from moslora_diffusion.app.training_jobs import TrainingError
from moslora_diffusion.files.safetensors_io import read_keys
from moslora_diffusion.formats.lora_files import read_lora_file
from moslora_diffusion.generation.text_to_image import GenerationRequest, MoLESettings
from moslora_diffusion.mole.gate_config import parse_gate_args


@pytest.fixture(scope="module")
def app(tiny_sd15_dir, tmp_path_factory):
    state, given = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    experts = make_experts(tiny_sd15_dir, given, ("dog", "cat"))
    for name in ("dog", "cat"):
        state.load_adapter(experts[name], 1.0)
    photos = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(("dog", "cat")):
        make_photos(photos / name, count=2, size=(64, 64), seed=10 * i)
    state.photo_roots.add(photos)
    write_mole(tiny_sd15_dir, [experts["dog"], experts["cat"]], given / "dog+cat" / "mole.safetensors")
    state.compose.load_available("dog+cat")
    return state, photos


def _settings(photos, **kwargs) -> GateSettings:
    values = dict(experts=["dog", "cat"], photo_dirs=[str(photos / "dog"), str(photos / "cat")],
                  prompts=["a photo of sks dog", "a photo of zwx cat"], steps=2, resolution=64)
    return GateSettings(**(values | kwargs))


def test_the_gate_trainer_accepts_the_apps_command(app, tmp_path):
    state, photos = app
    files = [state.loaded_adapters()[n] for n in ("dog", "cat")]
    settings = _settings(photos, steps="7", learning_rate=0.01)
    settings.check()
    cmd = build_gate_command("org/model", files, [photos / "dog", photos / "cat"], settings, tmp_path / "run", "cfg")
    assert cmd[1:4] == ["-m", "moslora_diffusion.mole", "train"]
    config = parse_gate_args(cmd[4:])  # what the trainer itself makes of it
    assert config.experts == tuple(map(str, files)) and config.max_train_steps == 7
    assert config.expert_data_dirs == (str(photos / "dog"), str(photos / "cat"))
    assert config.expert_prompts == ("a photo of sks dog", "a photo of zwx cat") and config.learning_rate == 0.01
    assert config.resolution == 64 and config.single_file_config == "cfg" and config.output_dir == str(tmp_path / "run")
    assert expert_defaults(files[0]) == ("", "a photo of sks dog")  # the trigger prompt the adapter records


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(experts=["dog"], photo_dirs=["x"], prompts=["p"]), TrainingError, "choose 2 to 8 loaded adapters"),
    (dict(experts=["dog", "bird"]), TrainingError, "no adapter loaded named bird"),
    (dict(experts=["dog", "dog"]), TrainingError, "chosen twice"),
    (dict(prompts=["a photo of sks dog"]), TrainingError, "one prompt per expert"),
    (dict(prompts=["a photo of sks dog", " "]), TrainingError, "an empty prompt"),
    (dict(steps=0), TrainingError, "steps must be between"),
    (dict(balance_weight=float("inf")), TrainingError, "balance weight must be"),
    (dict(photo_dirs=["/etc", "/tmp"]), PathNotAllowedError, "photo folders must lie in"),
])
def test_bad_gate_training_requests_are_refused_before_starting(app, kwargs, error, message):
    state, photos = app
    with pytest.raises(error, match=message):
        start_gate_training(state, _settings(photos, **kwargs))
    assert state.training.job is None


def test_gates_trained_from_the_app_are_loaded_for_composing(app):
    state, photos = app
    job = start_gate_training(state, _settings(photos))
    with pytest.raises(TrainingError, match="already in progress"):
        start_gate_training(state, _settings(photos))
    deadline = time.time() + 300
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    progress = job.progress()
    assert progress.state == "finished", progress.message
    assert (progress.step, progress.total) == (2, 2) and len(progress.losses) == 2  # from progress.jsonl
    assert state.register_finished_training() is None  # a gate run is no DreamBooth adapter
    name = register_finished_gates(state)
    assert name == job.output_dir.name and state.compose.experts(name) == ["dog", "cat"]
    loaded = dict(state.compose.moles)
    assert register_finished_gates(state) == name and state.compose.moles == loaded  # loaded once
    request = GenerationRequest("a photo of zwx cat", "", 3, 2, 5.0, 64, 64, 1, "DDIM", mole=MoLESettings(name))
    (saved,) = generate_composed(state, request, "mole")
    assert f"MoLE: {name}" in Image.open(saved.path).text["parameters"]


def test_static_export_carries_mask_and_scales_exactly_and_leaves_the_app_as_it_was(app):
    state, _ = app
    weights = weights_of(state.pipe)
    # cat masked: every block's renormalised gate is 1 for dog, so the fold is exactly 0.8 x dog's delta.
    path = export_mole(state, MoLESettings("dog+cat", {"dog": 0.8}, ["cat"]), "lora-kohya", "fp32")
    assert path.parent.parent == state.outputs / "exports"
    assert path.name.endswith("-mole+dog-cat-lora-kohya.safetensors")
    exported, kind = read_lora_file(path, state.pipe, "static")
    dog = state.fusion.adapters["dog"]
    assert kind == "kohya" and set(exported.layers) == set(dog.layers)
    for key, lora in exported.layers.items():
        torch.testing.assert_close(lora.delta(), 0.8 * dog.delta(key), rtol=0, atol=1e-6)
    assert same_state(weights, weights_of(state.pipe)) and not hasattr(state.pipe, "_moslora_mole")

    merged = export_mole(state, MoLESettings("dog+cat"), "merged-single-file", "fp16", ["a photo of sks dog"])
    assert any(k.startswith("model.diffusion_model.") for k in read_keys(merged))
    assert same_state(weights, weights_of(state.pipe))  # baked into a fresh copy, never the app's weights
    with pytest.raises(AppExportError, match="unknown export target"):
        export_mole(state, MoLESettings("dog+cat"), "lora-peft")
