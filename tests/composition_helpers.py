"""Shared by the composition tests: a tiny pipeline with two native experts (non-zero B) and small requests."""

from __future__ import annotations

import numpy as np
from diffusers import DiffusionPipeline
from mole_helpers import make_experts

from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.generation.text_to_image import GenerationRequest, run_pipeline
from moslora_diffusion.mole import load_experts

PIXEL_ATOL = 1.5 / 255  # uint8 rounding of hooks vs fused weights (the experts move pixels by > 0.1)
NAMES = ("dog", "style")  # dog: UNet + text attention; style: + feed-forward, time_emb_proj and text MLP


def pipeline_and_experts(model_dir, root, names=NAMES):
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    dirs = make_experts(model_dir, root, names)
    return pipe, load_experts(pipe, [dirs[n] for n in names]), dirs


def request(prompt: str = "a photo of sks dog", size: int = 64, steps: int = 2, guidance: float = 5.0,
            **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=0, steps=steps, guidance=guidance, width=size, height=size,
                             scheduler="DDIM", **kw)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def alone_pixels(pipe, dirs, name: str, req: GenerationRequest) -> np.ndarray:
    """The request's images with expert `name` fused into the weights (the reference for "that expert alone")."""
    fusion = FusedAdapters(pipe)
    fusion.add(name, dirs[name] / "moslora.safetensors", 1.0)
    try:
        return pixels(run_pipeline(pipe, req, None))
    finally:
        fusion.remove(name)
