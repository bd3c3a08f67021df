"""VAE posteriors of training images, each distinct image encoded once.

DreamBooth runs show the same few instance photos over and over (5 photos, 100 class images: 95% of
the instance rows of an epoch are repeats), and diffusers' script VAE-encodes every row of every step.
`PosteriorMemo` keys each row by its exact pixels (after crop and flip), so a repeat reuses the stored
posterior (mean, std) instead of running the encoder. Equal pixels give an equal posterior, so this
changes no result, unlike a latent cache that freezes the first crop and flip: a new crop is just a
new key. Rows are encoded one at a time so a row's posterior never depends on which rows share its
batch: a resumed run (empty memo) computes bit for bit what the uninterrupted run did.
"""

from __future__ import annotations

import hashlib

import torch

# What stored posteriors may take in host memory; past it, new rows are encoded and not stored. They live on
# the host, not the GPU: with random crops most rows never come back, and VRAM is what users run short of.
DEFAULT_BUDGET_BYTES = 1 << 30


def pixel_key(row: torch.Tensor) -> tuple:
    """A row's identity: its shape, dtype and a 128-bit digest of its bytes."""
    data = row.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return tuple(data.shape), str(data.dtype), digest


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std), each (B, 4, H/8, W/8); sampled per step with the step's own noise."""
    dist = vae.encode(pixel_values.to(device, vae.dtype, non_blocking=True)).latent_dist
    return dist.mean, dist.std


class PosteriorMemo:
    """`memo(pixel_values (B, 3, H, W))` -> (mean, std), each (B, C, h, w), encoding only unseen rows."""

    def __init__(self, vae, device, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.vae, self.device, self.budget_bytes = vae, device, budget_bytes
        self.stored: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stored_bytes = 0
        self.encoded = 0  # rows run through the encoder
        self.reused = 0  # rows answered from the memo

    def _posterior(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = pixel_key(row)
        hit = self.stored.get(key)
        if hit is not None:
            self.reused += 1
            return hit[0].to(self.device, non_blocking=True), hit[1].to(self.device, non_blocking=True)
        mean, std = encode_posterior(self.vae, row[None], self.device)
        self.encoded += 1
        size = mean.nbytes + std.nbytes
        if self.stored_bytes + size <= self.budget_bytes:
            self.stored[key] = (mean.to("cpu"), std.to("cpu"))
            self.stored_bytes += size
        return mean, std

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = zip(*(self._posterior(row) for row in pixel_values), strict=True)
        return torch.cat(means), torch.cat(stds)
