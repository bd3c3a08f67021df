"""--validation_metrics and --keep_best: validation images scored at every validation step (toy checker on the toy
base; DINO / CLIP-I / CLIP-T with tiny random models), logged to progress.jsonl and TensorBoard, the best step's
adapter kept with its step and scores; bad combinations refused before anything loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from training_helpers import forbid_model_load, run_training, tiny_config

from moslora_diffusion import read_adapter
from moslora_diffusion.training.run_folder.manifest import read_manifest
from moslora_diffusion.training.settings.config import ConfigError

TOY = Path(__file__).resolve().parents[1] / "assets"
PROMPT = "a photo of sks star"


def _validations(out: Path) -> list[dict]:
    lines = (out / "progress.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "validation_images" in r]


def test_toy_scores_every_validation_and_keeps_the_best(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(TOY / "toy-base", TOY / "toy-subject", out, resolution=64, instance_prompt=PROMPT,
                         max_train_steps=4, validation_prompt=PROMPT, validation_steps=1, num_validation_images=2,
                         validation_metrics="toy", keep_best=True, report_to="tensorboard", learning_rate=3e-3)
    run_training(config)
    records = _validations(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # every validation step, the final one included
    for r in records:
        assert set(r["scores"]) == {"toy_subject", "toy_prompt"}
        assert all(0.0 <= v <= 1.0 for v in r["scores"].values())
    means = [sum(r["scores"].values()) / 2 for r in records]
    best_step = records[means.index(max(means))]["step"]  # the first of equal bests is kept
    kept = read_adapter(out / "moslora_best.safetensors").info["best"]
    assert kept["step"] == best_step and kept["score"] == pytest.approx(max(means))
    assert [r["step"] for r in records if r.get("best")][-1] == best_step
    assert "moslora_best.safetensors" in read_manifest(out)  # --overwrite_output_dir may delete it, as ours
    assert f"step {best_step}" in (out / "README.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert [e.step for e in events.Scalars("validation/toy_subject")] == [1, 2, 3, 4]


def test_dreambench_metrics_with_tiny_dino_and_clip(tiny_sd15_dir, tiny_scorer_dirs, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_sd15_dir, TOY / "toy-subject", out, max_train_steps=2, validation_prompt="a sks dog",
                         validation_steps=1, num_validation_images=1, validation_metrics="dreambench",
                         dino_model=str(tiny_scorer_dirs["dino"]), clip_model=str(tiny_scorer_dirs["clip"]))
    run_training(config)
    records = _validations(out)
    assert [set(r["scores"]) for r in records] == [{"dino", "clip_i", "clip_t"}] * 2
    assert all(-1.0 <= v <= 1.0 for r in records for v in r["scores"].values())
    assert not (out / "moslora_best.safetensors").exists()  # only with --keep_best


@pytest.mark.parametrize(("overrides", "message"), [
    ({"keep_best": True, "validation_prompt": PROMPT}, "--keep_best needs scores"),
    ({"validation_metrics": "toy"}, "give --validation_prompt"),
])
def test_bad_combinations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run", **overrides)


def test_report_to_wandb_without_the_package_names_it(tmp_path, monkeypatch):
    import importlib.util

    from moslora_diffusion.training.model.optim import check_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run", report_to="wandb")
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package, which is not installed: pip "
                                         "install wandb"):
        check_packages(config)
    check_packages(tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run"))  # tensorboard: installed
    with pytest.raises(ValueError, match="pip install wandb"):
        run_training(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_toy_scores_need_the_toy_size_once_the_model_gives_its_own(tmp_path):
    """No --resolution: the model's own size decides, checked as soon as the model is known (before any step)."""
    import types

    from moslora_diffusion.training.trainer.plan import training_resolution

    config = tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run", resolution=None,
                         validation_metrics="toy", validation_prompt="a photo of sks star")
    model = types.SimpleNamespace(info=types.SimpleNamespace(default_resolution=512))
    with pytest.raises(ValueError, match="toy world's 64x64 images, got --resolution 512"):
        training_resolution(config, model)
    model.info.default_resolution = 64
    assert training_resolution(config, model) == 64


def test_without_resolution_a_run_trains_at_the_base_models_own_size(tmp_path):
    """The embedded toy base (16 x 16 latents, VAE factor 4) was trained at the SD 1.x family's 512 px: 64 x the
    pixels of its 64 px world (`mole train` on the toy base hit it first)."""
    import types

    from moslora_diffusion.training.trainer.plan import training_resolution

    config = tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run", resolution=None)

    def base(sample_size, factor):
        pipe = types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=sample_size)),
                                     vae_scale_factor=factor)
        return types.SimpleNamespace(pipe=pipe, info=types.SimpleNamespace(default_resolution=512))

    assert training_resolution(config, base(16, 4)) == 64  # the toy base
    assert [training_resolution(config, base(s, 8)) for s in (64, 96, 128)] == [512, 768, 1024]  # SD 1.5, 2.1, XL
    assert training_resolution(replace(config, resolution=128), base(16, 4)) == 128  # --resolution wins


def test_dreambench_scorer_models_are_fetched_before_the_model_loads(tmp_path, monkeypatch, tiny_scorer_dirs):
    """Offline and not in the hub cache: the trainer stops at once, not at its first validation (both trainers
    share this check, training/optim.py check_packages)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forbid_model_load(monkeypatch)
    config = tiny_config(TOY / "toy-base", TOY / "toy-subject", tmp_path / "run", validation_metrics="dreambench",
                         validation_prompt="a photo of sks star", dino_model=str(tiny_scorer_dirs["dino"]),
                         clip_model="moslora-tests/no-such-clip")
    with pytest.raises(OSError, match="the CLIPModel scorer 'moslora-tests/no-such-clip' is not in the hub cache"):
        run_training(config)
    assert not (tmp_path / "run").exists()
