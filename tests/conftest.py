"""Shared fixtures: tiny pipelines saved to disk once per test session (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from moslora_diffusion.console.allocator import tune_allocator
from moslora_diffusion.models.tiny import save_tiny_pipeline

tune_allocator()  # the commands' allocator settings (console/allocator.py) for the suite's in-process trainings

# Tiny models gain nothing from several threads, and on a busy 2-core machine (CI, or engineers running
# tests side by side) oversubscribed threads make them up to 8x slower. Subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_latent_cache(tmp_path_factory, monkeypatch):
    """Every test its own latent cache (inherited by the trainings it starts): none reads what another wrote,
    and nothing lands in the user's ~/.cache."""
    monkeypatch.setenv("MOSLORA_CACHE_DIR", str(tmp_path_factory.mktemp("moslora-cache")))


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


def make_adapter(model_dir, path, seed: int = 0, rank: int = 4, alpha: float = 8, unet_targets="attn",
                 text_targets="attn", std: float = 0.3, kind: str = "moslora", mixer_init: str = "kaiming"):
    """Attaches an adapter to a fresh tiny pipeline, randomises B (non-zero) and saves it to `path`."""
    from diffusers import DiffusionPipeline

    from moslora_diffusion import AdapterConfig, attach_to_pipeline, save_adapter

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    attach_to_pipeline(pipe, AdapterConfig(kind=kind, rank=rank, alpha=alpha, mixer_init=mixer_init),
                       unet_targets=unet_targets, text_targets=text_targets)
    randomize_adapters(pipe, seed=seed, std=std)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(pipe, path, info={"base_model": str(model_dir), "instance_prompt": "a photo of sks dog"})


@pytest.fixture(scope="session")
def tiny_scorer_dirs(tmp_path_factory):
    """Random DINO-shaped ViT and CLIP models with their processors, saved as safetensors (nothing downloaded):
    {"dino": folder, "clip": folder}."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from moslora_diffusion.models.tiny import load_clip_tokenizer, write_clip_tokenizer

    root = tmp_path_factory.mktemp("tiny-scorers")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(root / "dino", safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    write_clip_tokenizer(root / "clip", ("sks", "dog", "star", "photo"))
    tokenizer = load_clip_tokenizer(root / "clip")
    text = {"vocab_size": tokenizer.vocab_size + 2, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "clip", safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    return {"dino": root / "dino", "clip": root / "clip"}
