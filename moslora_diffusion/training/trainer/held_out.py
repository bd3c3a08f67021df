"""--validation_loss_photos N: a held-out diffusion loss that is comparable from one validation to the next.

N instance photos are set aside before training (never trained on): spread evenly over the photos sorted by
path, so a folder shot in a few sessions lends each session's photos a chance. Each is encoded once (centre
crop at the training resolution, no flip, the VAE posterior mean) and paired with TIMESTEPS_PER_PHOTO timesteps,
stratified over the trained range, and one noise tensor per row, all drawn once from a generator seeded with
--seed. Every validation scores the same (latent, noise, timestep) rows, so a change of the number is a change
of the weights, never of the draw. The loss is the plain MSE of the UNet's prediction against the training
target (noise, or velocity for v-prediction), without Min-SNR weights or the prior term: the same units as the
training loss at Min-SNR off, on photos the adapter never saw.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ...data import DreamBoothDataset, ImageRecord, PhotoScan, collate
from ..run_folder.outputs import append_progress
from ..settings.config import ConfigError
from ..step.objective import sample_latents

if TYPE_CHECKING:
    from .run import Run

TIMESTEPS_PER_PHOTO = 8
MIN_TRAINING_PHOTOS = 2


def held_out_indices(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total): the middle of each of `count` equal slices."""
    return sorted({int((i + 0.5) * total / count) for i in range(count)})


def split_held_out(scan: PhotoScan, count: int) -> tuple[PhotoScan, list[ImageRecord]]:
    """(the scan with `count` photos removed, those photos); count 0 gives (scan, []).

    Raises ConfigError when fewer than MIN_TRAINING_PHOTOS photos would remain to train on (before any load)."""
    if count == 0:
        return scan, []
    records = sorted(scan.records, key=lambda r: str(r.path))
    if len(records) - count < MIN_TRAINING_PHOTOS:
        raise ConfigError(f"--validation_loss_photos {count} leaves {len(records) - count} of the {len(records)} "
                          f"photos in {scan.folder} to train on; keep at least {MIN_TRAINING_PHOTOS} (use fewer "
                          "held-out photos, or add photos)")
    chosen = set(held_out_indices(count, len(records)))
    kept = [r for i, r in enumerate(records) if i not in chosen]
    return replace(scan, records=kept), [records[i] for i in sorted(chosen)]


class HeldOutLoss:
    """The held-out rows, drawn once; `loss(run)` scores the current weights on them.

    Per photo: latents (T, C, h, w), noise (T, C, h, w), timesteps (T,), with T = TIMESTEPS_PER_PHOTO."""

    def __init__(self, run: Run, records: list[ImageRecord]):
        config, base = run.config, run.base
        self.records = list(records)
        dataset = DreamBoothDataset([replace(r, repeats=1) for r in records], run.plan.resolution,
                                    center_crop=True, random_flip=False, seed=config.seed)
        generator = torch.Generator().manual_seed(config.seed)  # on the CPU: the same rows on every device
        low, high = run.plan.timestep_range
        self.rows = []
        for index in range(len(dataset)):
            batch = collate([dataset[index]])
            mean, std = run.posteriors(batch["pixel_values"])
            latents = sample_latents(mean, std, torch.zeros_like(mean), base.vae.config.scaling_factor,
                                     getattr(base.vae.config, "shift_factor", None))
            noise = torch.randn((TIMESTEPS_PER_PHOTO, *latents.shape[1:]), generator=generator)
            strata = torch.arange(TIMESTEPS_PER_PHOTO) + torch.rand(TIMESTEPS_PER_PHOTO, generator=generator)
            timesteps = (low + (high - low) * strata / TIMESTEPS_PER_PHOTO).long().clamp(low, high - 1)
            rows = {"prompts": batch["prompts"] * TIMESTEPS_PER_PHOTO,
                    **{k: batch[k].repeat(TIMESTEPS_PER_PHOTO, 1)
                       for k in ("original_sizes", "crop_top_lefts", "target_sizes")}}
            device = latents.device
            self.rows.append((latents.expand(TIMESTEPS_PER_PHOTO, -1, -1, -1), noise.to(device),
                              timesteps.to(device), rows))
        if run.conditioning.cache:  # frozen text encoders: embed now, before the loop may move them off the device
            run.conditioning.precompute([r.caption for r in records])

    @torch.no_grad()
    def loss(self, run: Run) -> float:
        """Mean squared error over every held-out row (fp32), with the weights the model holds now.

        Call it on every process: the UNet (and trained text encoders) may be DDP modules, whose forward runs
        collectively."""
        scheduler, dtype = run.noise_scheduler, run.base.weight_dtype
        total = 0.0
        with run.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            for latents, noise, timesteps, batch in self.rows:
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = (scheduler.get_velocity(latents, noise, timesteps)
                          if run.plan.prediction_type == "v_prediction" else noise)
                kwargs = run.conditioning.unet_kwargs(batch, dtype)
                pred = run.models["unet"](noisy.to(dtype), timesteps, **kwargs, return_dict=False)[0]
                total += torch.nn.functional.mse_loss(pred.float(), target.float()).item()
        return total / len(self.rows)


def log_held_out_loss(run: Run, step: int) -> float:
    """Scores the held-out photos (every process), logs "val_loss" to the trackers and progress.jsonl (main)."""
    with run.ema.swapped_in() if run.ema is not None else nullcontext():
        value = run.held_out.loss(run)
    run.accelerator.log({"val_loss": value}, step=step)
    if run.accelerator.is_main_process:
        append_progress(run.config.output_dir, [{"step": step, "val_loss": value}])
    return value
