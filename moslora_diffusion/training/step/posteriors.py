"""VAE posteriors of training images, each distinct image encoded once.

DreamBooth runs show the same few instance photos over and over (5 photos, 100 class images: 95% of
the instance rows of an epoch are repeats), and diffusers' script VAE-encodes every row of every step.
`PosteriorMemo` keys each row by its exact pixels (after crop and flip), so a repeat reuses the stored
posterior (mean, std) instead of running the encoder. Equal pixels give an equal posterior, so this
changes no result, unlike a latent cache that freezes the first crop and flip: a new crop is just a
new key. Rows are encoded one at a time so a row's posterior never depends on which rows share its
batch: a resumed run (empty memo) computes bit for bit what the uninterrupted run did.

With a `PosteriorStore` (posterior_store.py) the memo also answers from what earlier runs encoded with the
same VAE, and `persist()` hands it what this run encoded.
"""

from __future__ import annotations

import hashlib
import warnings

import torch

from .posterior_store import PosteriorStore, tensor_bytes

# What stored posteriors may take in host memory; past it, new rows are encoded and not stored. They live on
# the host, not the GPU: with random crops most rows never come back, and VRAM is what users run short of.
DEFAULT_BUDGET_BYTES = 1 << 30


def pixel_key(row: torch.Tensor) -> str:
    """A row's identity: a 128-bit digest of its shape, dtype and bytes (hex)."""
    digest = hashlib.blake2b(f"{tuple(row.shape)}:{row.dtype}:".encode(), digest_size=16)
    digest.update(tensor_bytes(row))
    return digest.hexdigest()


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std), each (B, 4, H/8, W/8); sampled per step with the step's own noise."""
    dist = vae.encode(pixel_values.to(device, vae.dtype, non_blocking=True)).latent_dist
    return dist.mean, dist.std


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor that does not make the CPU wait for the GPU: `.to("cpu")` would, once per
    new image, in the middle of the training loop. The copy goes into pinned memory in stream order; a later
    `.to(device)` of it is queued behind it, and `persist` synchronizes before reading it on the host."""
    if tensor.device.type != "cuda":
        return tensor.to("cpu")
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class PosteriorMemo:
    """`memo(pixel_values (B, 3, H, W))` -> (mean, std), each (B, C, h, w), encoding only unseen rows."""

    def __init__(self, vae, device, budget_bytes: int = DEFAULT_BUDGET_BYTES, store: PosteriorStore | None = None):
        self.vae, self.device, self.budget_bytes, self.store = vae, device, budget_bytes, store
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new_keys: list[str] = []  # stored entries the encoder computed in this run (for the store)
        self.stored_bytes = 0
        self.encoded = 0  # rows run through the encoder
        self.reused = 0  # rows answered from the memo or the store
        self.from_store = 0  # distinct rows the store answered

    def _posterior(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = pixel_key(row)
        hit = self.stored.get(key)
        if hit is None and self.store is not None:
            hit = self.store.get(key)
            if hit is not None:
                self.from_store += 1
                self._keep(key, *hit)
        if hit is not None:
            self.reused += 1
            return hit[0].to(self.device, non_blocking=True), hit[1].to(self.device, non_blocking=True)
        mean, std = encode_posterior(self.vae, row[None], self.device)
        self.encoded += 1
        if self._keep(key, _to_host(mean), _to_host(std)):
            self.new_keys.append(key)
        return mean, std

    def _keep(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> bool:
        size = mean.nbytes + std.nbytes
        if self.stored_bytes + size > self.budget_bytes:
            return False
        self.stored[key] = (mean, std)
        self.stored_bytes += size
        return True

    def persist(self) -> None:
        """Writes this run's new entries to the store (once; a failure is a warning, never an error)."""
        if self.store is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the asynchronous copies of _to_host have landed
        entries = {key: self.stored[key] for key in self.new_keys}
        try:
            self.store.write(entries)
        except Exception as err:  # a full disk or a read-only cache folder must not fail a finished run
            warnings.warn(f"latent cache: could not write to {self.store.folder} ({err}); the next run "
                          "encodes these images again", stacklevel=2)
        self.new_keys = []

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = zip(*(self._posterior(row) for row in pixel_values), strict=True)
        return torch.cat(means), torch.cat(stds)
