"""Shared by the app tests: small adapters saved from tiny pipelines (non-zero B, so nothing is trivial)."""

from __future__ import annotations

import torch
from conftest import randomize_adapters
from diffusers import DiffusionPipeline

from moslora_diffusion import AdapterConfig, attach_to_pipeline, save_adapter


def make_adapter(model_dir, path, seed: int = 0, rank: int = 4, alpha: float = 8, unet_targets="attn",
                 text_targets="attn", std: float = 0.3, kind: str = "moslora"):
    """Attaches a MoSLoRA adapter to a fresh tiny pipeline, randomises B and saves it to `path`."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    attach_to_pipeline(pipe, AdapterConfig(kind=kind, rank=rank, alpha=alpha), unet_targets=unet_targets,
                       text_targets=text_targets)
    randomize_adapters(pipe, seed=seed, std=std)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(pipe, path, info={"base_model": str(model_dir), "instance_prompt": "a photo of sks dog"})


def one_thread():
    """Generator for a fixture: tiny models run faster on one thread, and the CI machine is shared (2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
