"""Shared by the composition tests: a tiny pipeline with two native experts (non-zero B) and small requests."""

from __future__ import annotations

import numpy as np
from diffusers import DiffusionPipeline
from mole_helpers import make_experts

from moslora_diffusion.generation.text_to_image import GenerationRequest
from moslora_diffusion.mole import load_experts

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
