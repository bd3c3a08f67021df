"""Shared by the LoRA Switch / LoRA Composite tests (composition/one_at_a_time.py): "expert alone" references
fused into the weights (an implementation independent of the hooks under test), recorded UNet calls and a
pipeline snapshot."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DiffusionPipeline
from mole_helpers import state

from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.generation.text_to_image import GenerationRequest, make_scheduler, run_pipeline
from moslora_diffusion.moslora.pipeline import model_components

# Hooks compute W x + up (down x), the fused reference (W + up down) x: equal up to fp32 reassociation; observed
# <= 2e-6 on UNet outputs of magnitude ~1 (an expert moves them by 0.1-0.7), as in test_mole_model.py.
UNET_ATOL = 2e-5
# Whole images (4 steps, VAE, uint8): that difference moves a pixel by at most one level (observed 0-1).
PIXEL_ATOL = 1


def fresh(model_dir) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def alone(model_dir, folder=None) -> DiffusionPipeline:
    """The base model with the native adapter in `folder` fused at scale 1 (None: the base model)."""
    pipe = fresh(model_dir)
    if folder is not None:
        FusedAdapters(pipe).add("expert", folder / "moslora.safetensors", 1.0)
    return pipe


def image(pipe, req: GenerationRequest) -> np.ndarray:
    """The first image of run_pipeline as int array (H, W, 3), scheduler as the request names it."""
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    return np.asarray(run_pipeline(pipe, req, None)[0]).astype(int)


@dataclass
class Call:
    args: tuple  # (latent batch (2B, 4, h, w), timestep)
    kwargs: dict  # as the pipeline passed them (expert 0's conditioning)
    output: torch.Tensor  # what the pipeline received


@contextmanager
def unet_calls(pipe):
    """Every UNet call of the block, in order, as the pipeline made it and with what it got back."""
    calls: list[Call] = []

    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        calls.append(Call(tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs), out.clone()))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def conditioning(pipe, req: GenerationRequest) -> dict:
    """The UNet keyword arguments `pipe` builds for `req` (its own prompt encoding), from its first UNet call."""
    with unet_calls(pipe) as calls:
        image(pipe, replace(req, steps=1))
    return calls[0].kwargs


@torch.no_grad()
def unet_output(pipe, call: Call, kwargs: dict) -> torch.Tensor:
    return pipe.unet(*call.args, **kwargs)[0]


def guided(output: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of a [negative; positive] batch: u + w (c - u)."""
    uncond, cond = output.chunk(2)
    return uncond + scale * (cond - uncond)


def hook_count(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in model_components(pipe).values()
               for m in model.modules())


def snapshot(pipe) -> dict:
    """What composition must leave as it found it."""
    return {"state": state(pipe), "hooks": hook_count(pipe), "pipe": set(vars(pipe)), "unet": set(vars(pipe.unet)),
            "scheduler": pipe.scheduler, "config": dict(pipe.config)}
