"""Shared fixtures: tiny pipelines saved to disk once per test session (no downloads)."""

from __future__ import annotations

import pytest
import torch

from moslora_diffusion.tiny import save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    return save_tiny_pipeline("sd2", tmp_path_factory.mktemp("tiny-sd2") / "model", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}


def generate(pipe, seed: int = 0, **kwargs):
    """A 2-step 32x32 image as a numpy array: enough to compare pipelines exactly."""
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


@torch.no_grad()
def randomize_adapters(pipe, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero B (and perturbed M) so no equality in a test is trivially true."""
    from moslora_diffusion import pipeline_adapters

    g = torch.Generator().manual_seed(seed)
    for layers in pipeline_adapters(pipe).values():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
