"""The diffusion objective of toy pretraining: noise, loss weights, EMA and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10%."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


def loss_weights(scheduler, timesteps: torch.Tensor, cfg) -> torch.Tensor:
    """Weights of the epsilon MSE, chosen as weights lambda(SNR) on the implied x0 error (eps MSE = SNR * x0 MSE).

    Min-SNR-gamma caps lambda at gamma for nearly clean inputs. At high noise plain epsilon loss gives
    lambda = SNR -> 0: a wrong background colour or position costs almost nothing exactly where only the caption
    can decide them, so we floor lambda there (capped, so those steps do not swamp the batch).
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    x0_weight = torch.clamp(torch.clamp(snr, max=cfg.min_snr_gamma), min=cfg.high_noise_floor)
    return torch.clamp(x0_weight / snr, max=cfg.max_loss_weight)


def multires_noise(latents: torch.Tensor, levels: int, discount: float) -> torch.Tensor:
    """Gaussian noise plus coarser Gaussian noise upsampled (8x8, 4x4, ... 1x1), rescaled to unit variance.

    Plain white noise hides a 16x16 latent's low frequencies (background colour, where the object is) only at
    the very last timesteps, so the model learns to read them from the input rather than from the caption.
    """
    noise = torch.randn_like(latents)
    size, total = latents.shape[-1], 1.0
    for k in range(1, levels + 1):
        coarse = torch.randn(*latents.shape[:2], max(1, size >> k), max(1, size >> k), device=latents.device)
        noise = noise + discount**k * F.interpolate(coarse, size=latents.shape[-2:], mode="nearest")
        total += discount ** (2 * k)
    return noise / math.sqrt(total)


def diffusion_loss(unet, text_encoder, scheduler, latents, input_ids, cfg) -> torch.Tensor:
    """Weighted epsilon MSE of one batch; `cfg` is a PretrainConfig (noise and weighting settings)."""
    noise = multires_noise(latents, cfg.multires_levels, cfg.multires_discount)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    hidden = text_encoder(input_ids)[0]  # B x 77 x text_hidden: what the pipeline feeds cross-attention
    pred = unet(noisy, t, hidden).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weights(scheduler, t, cfg)).mean()
