"""The denoising objective: deterministic noise for the global batch, the target, Min-SNR, prior loss.

Determinism across process counts: every random draw of a micro-step comes from a generator seeded by
(seed, micro-step) and is drawn for the GLOBAL batch on every rank; each rank keeps its own rows. So N
processes with batch b draw exactly the numbers one process with batch N*b draws, and a resumed run
draws what the uninterrupted run drew at the same step.

Row layout. A local batch is [instance rows (b), class rows (b) with prior preservation]. Globally the
rows are a (groups, G) grid with groups = 2 with prior preservation (instances, classes), G = N*b; rank r
owns columns r*b .. r*b+b-1 of every group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .masking import masked_row_mse


def step_generator(seed: int, micro_step: int, device: torch.device) -> torch.Generator:
    # SeedSequence mixes (seed, step) into a well-spread 63-bit seed; the same on every rank.
    mixed = int(np.random.SeedSequence([seed, micro_step]).generate_state(1, dtype=np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(mixed)


@dataclass(frozen=True)
class RowLayout:
    """Which rows of the global batch this rank holds."""

    per_device: int  # b: instance rows per rank
    num_processes: int  # N
    process_index: int  # r
    groups: int  # 2 with prior preservation, else 1

    @property
    def global_batch(self) -> int:
        return self.per_device * self.num_processes

    def local(self, global_rows: torch.Tensor) -> torch.Tensor:
        """(groups, G, ...) -> this rank's (groups * b, ...), instance rows first."""
        start = self.process_index * self.per_device
        mine = global_rows[:, start:start + self.per_device]
        return mine.reshape(self.groups * self.per_device, *global_rows.shape[2:])

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Standard normal values for this rank's rows; `shape` is the per-row shape."""
        full = torch.randn((self.groups, self.global_batch, *shape), generator=generator,
                           device=generator.device, dtype=torch.float32)
        return self.local(full)

    def randint(self, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
        full = torch.randint(low, high, (self.groups, self.global_batch), generator=generator,
                             device=generator.device)
        return self.local(full)


@dataclass
class Draws:
    latent_eps: torch.Tensor  # (rows, C, h, w): samples the VAE posterior
    noise: torch.Tensor  # (rows, C, h, w)
    timesteps: torch.Tensor  # (rows,) int64


def draw(layout: RowLayout, latent_shape, generator: torch.Generator, noise_offset: float,
         timestep_range: tuple[int, int]) -> Draws:
    """All random numbers of one micro-step, always drawn in the same order."""
    latent_eps = layout.randn(latent_shape, generator)
    noise = layout.randn(latent_shape, generator)
    if noise_offset:
        # One offset per image and channel: lets the model shift overall brightness (Guttenberg, 2023).
        noise = noise + noise_offset * layout.randn((latent_shape[0], 1, 1), generator)
    timesteps = layout.randint(*timestep_range, generator)
    return Draws(latent_eps, noise, timesteps)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling_factor: float,
                   shift_factor: float | None) -> torch.Tensor:
    """A sample of the VAE posterior, scaled as the UNet expects (fp32)."""
    latents = mean.float() + std.float() * eps
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) for the given timesteps (B,)."""
    alpha_bar = alphas_cumprod[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    # For v-prediction the loss already carries a factor snr + 1 relative to epsilon.
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, num_instance: int,
                   alphas_cumprod: torch.Tensor, prediction_type: str, snr_gamma: float | None,
                   prior_loss_weight: float, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean instance loss (Min-SNR weighted) + prior_loss_weight * mean class loss.

    Min-SNR weights are computed for the instance rows only: the class rows have their own term.
    masks: (B, 1, H, W) pixel masks for --masked_loss (masking.py), or None.
    """
    if masks is not None:
        per_row = masked_row_mse(pred, target, masks)
    else:
        per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    instance, prior = per_row[:num_instance], per_row[num_instance:]
    if snr_gamma is not None:
        instance = instance * min_snr_weights(timesteps[:num_instance], alphas_cumprod, snr_gamma, prediction_type)
    loss = instance.mean()
    if prior.numel():
        loss = loss + prior_loss_weight * prior.mean()
    return loss
