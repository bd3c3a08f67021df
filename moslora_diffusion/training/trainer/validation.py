"""Validation images during training, generated with the live modules and never touching their weights.

The pipeline is the training pipeline itself: no copy, no `.to(dtype)` (diffusers' DreamBooth scripts
rebuild a pipeline with torch_dtype=fp16 around the live UNet, which casts the trainable LoRA weights to
fp16 in place, diffusers issue #13124). Mixed dtypes (fp32 adapters, fp16 base, an fp32 SDXL VAE) are
handled by autocast, which casts per operation and leaves the parameters alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ...files.atomic import save_image
from ..run_folder.manifest import record_written
from ..run_folder.outputs import VALIDATION_DIR, append_progress, validation_image_name
from .validation_scores import keep_if_best, score_validation


def generate_images(pipe, prompt: str, count: int, steps: int, resolution: int, seed: int, autocast) -> list:
    """`count` PIL images, one seed each (seed, seed + 1, ...) so every validation shows the same noise."""
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(count)]
    trained = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
               if m is not None]
    modes = [m.training for m in trained]
    for module in trained:
        module.eval()
    try:
        # A --torch_compile UNet runs eagerly here: a few dozen inference calls would not repay compiling an
        # eval-mode, no-grad graph of another batch size.
        with torch.no_grad(), autocast, torch.compiler.set_stance("force_eager"):
            return pipe([prompt] * count, num_inference_steps=steps, height=resolution, width=resolution,
                        generator=generators).images
    finally:
        for module, mode in zip(trained, modes, strict=True):
            module.train(mode)


def run_validation(pipe, config, resolution: int, step: int, accelerator, ema=None) -> list[Path]:
    """Generates, saves under <output_dir>/validation/, scores (--validation_metrics) and logs to the trackers and
    progress.jsonl; with --keep_best keeps the adapter when this step scores best. Returns the image paths.

    With EMA the EMA weights are swapped in for the images and the kept adapter (they are what will be saved)
    and the live weights restored bit for bit afterwards.
    """
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    record: dict = {"step": step}
    with ema.swapped_in() if ema is not None else nullcontext():
        images = generate_images(pipe, config.validation_prompt, config.num_validation_images,
                                 config.validation_inference_steps, resolution, config.seed, autocast)
        if config.validation_metrics != "none":
            record["scores"] = score_validation(config, images, pipe.unet.device)
            if config.keep_best and keep_if_best(pipe, config, step, record["scores"]):
                record["best"] = True
    folder = Path(config.output_dir) / VALIDATION_DIR
    record_written(config.output_dir, VALIDATION_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / validation_image_name(step, i)
        paths.append(save_image(image, path))
    if accelerator is not None:
        _log_images(accelerator, images, step)
        if "scores" in record:
            accelerator.log({f"validation/{name}": value for name, value in record["scores"].items()}, step=step)
    record["validation_images"] = [p.relative_to(config.output_dir).as_posix() for p in paths]
    append_progress(config.output_dir, [record])
    return paths


def _log_images(accelerator, images, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])  # (N, H, W, 3) uint8
            tracker.log_images({"validation": stacked}, step, dataformats="NHWC")
