"""The masked denoising loss (--masked_loss): only the subject's latent pixels count.

Per row: loss = sum(m * e) / sum(m) over the latent pixels, e the squared error averaged over the latent channels,
m the photo's mask area-averaged down to the latent grid (each latent pixel weighs the share of its 8 x 8 photo
pixels that are subject). A weighted MEAN, not kohya's mean(m * e): a subject filling a fifth of the frame would
otherwise train at a fifth of the loss, i.e. of the learning rate, and the instance term would shrink against the
prior-preservation term. With an all-ones mask (class rows) it is the plain MSE, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_masks(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) in [0, 1] -> (B, 1, h, w) by area average (the VAE's 8 x 8 footprint)."""
    return F.interpolate(masks.float(), size=latent_hw, mode="area")


def masked_row_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-row masked MSE (B,) of pred/target (B, C, h, w) under pixel masks (B, 1, H, W).

    A row whose crop holds no subject at all (sum(m) = 0) scores 0: it neither trains nor divides by zero.
    """
    weights = latent_masks(masks.to(pred.device), tuple(pred.shape[-2:]))[:, 0]  # (B, h, w)
    errors = (pred.float() - target.float()).pow(2).mean(dim=1)  # (B, h, w)
    return (weights * errors).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-8)
