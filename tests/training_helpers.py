"""Helpers for the training tests: tiny photo folders, tiny configs, running train() in-process or as a CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


def make_photos(folder: Path, count: int = 2, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """`count` random-noise photos (w x h) saved as PNG, each different."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    return folder


def tiny_config(model: Path, photos: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A run small enough for a 2-core CPU: 32 px, rank 4, a few steps, no TensorBoard."""
    settings = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(photos), instance_prompt=PROMPT,
                    output_dir=str(output_dir), resolution=32, rank=4, max_train_steps=2, learning_rate=1e-2,
                    report_to="none", checkpointing_steps=1000, logging_steps=1, class_inference_steps=2,
                    sample_batch_size=2, validation_inference_steps=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a test process runs many independent trainings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_training(config: TrainConfig):
    reset_accelerate()
    try:
        return train(config)
    finally:
        reset_accelerate()


def cli_args(config: TrainConfig) -> list[str]:
    """The command line equivalent to a TrainConfig (only the settings that differ from the defaults)."""
    default = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="p")
    args = []
    for key, value in config.to_dict().items():
        if value == getattr(default, key) and key not in ("pretrained_model_name_or_path", "instance_data_dir",
                                                          "instance_prompt"):
            continue
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def cli_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def start_cli(config: TrainConfig, launcher: list[str] | None = None, **env) -> subprocess.Popen:
    command = (launcher or [sys.executable]) + [str(REPO / "train_dreambooth.py")] + cli_args(config)
    return subprocess.Popen(command, cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(Path(output_dir) / "moslora.safetensors")[0]


def snapshot(tree: Path) -> dict[str, bytes]:
    """Every file under `tree` with its bytes: to show a folder was left untouched."""
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until `path` exists (a checkpoint the process writes); fails the test if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited (status {proc.returncode}) before writing {path}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.01)


def forbid_model_load(monkeypatch) -> None:
    """Fail the test if the trainer loads the base model. Patches the name the trainer calls (components.py imports
    load_pipeline by name, so patching models.loading.load_pipeline would never fire)."""
    from moslora_diffusion.training.model import components

    monkeypatch.setattr(components, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
