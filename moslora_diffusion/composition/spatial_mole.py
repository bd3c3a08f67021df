"""`spatial_mole`: MoLE with each UNet block's gate evaluated per latent position (mole/positions.py), and the map
of which expert each position chose (the gates averaged over blocks and denoising steps, the prompt half of the
guidance batch) as the masks of the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..generation.text_to_image import GenerationRequest, run_pipeline
from ..mole import Expert, attach_mole, detach_mole
from ..moslora.pipeline import model_components, model_module_name


class PositionMaps:
    """Sums each block's per-position gate (resized to latent size) over the forwards of a generation."""

    def __init__(self, mole, images: int, size: tuple[int, int]):
        self.mole, self.images = mole, images
        self.total = torch.zeros(images, len(mole.experts), *size)
        self.count = 0

    @torch.no_grad()
    def __call__(self, block: str) -> None:
        weights = self.mole.current_gates().get(block)
        if weights is None or weights.dim() != 3:
            return  # fixed gates: no per-position weights to show
        h, w = self.mole.grids[block]
        rows = weights[-self.images:].float().transpose(1, 2).reshape(self.images, -1, h, w)
        self.total += F.interpolate(rows, size=self.total.shape[-2:], mode="bilinear", align_corners=False).cpu()
        self.count += 1

    def shares(self) -> torch.Tensor:
        """(images, N, H, W): the mean gate per position (sums to 1 over the experts)."""
        return self.total / max(self.count, 1)


def generate_spatial_mole(pipe, experts: Sequence[Expert], req: GenerationRequest,
                          gates: Mapping[str, torch.Tensor] | None) -> tuple[list[Image.Image], torch.Tensor]:
    """Images through per-position gates (gates: a gate_state, block- or position-trained: the parameters are the
    same; None: uniform) and the (images, N, h, w) latent-size map of the gates."""
    mole = attach_mole(pipe, experts, gates, granularity="position")
    factor = int(pipe.vae_scale_factor)
    maps = PositionMaps(mole, req.num_images, (req.height // factor, req.width // factor))
    unet = model_components(pipe)["unet"]
    handles = [unet.get_submodule(model_module_name(unet, block.module)).register_forward_hook(
        lambda *_, name=block.name: maps(name)) for block in mole.blocks if block.kind == "unet"]
    try:
        images = run_pipeline(pipe, req, None)
    finally:
        for handle in handles:
            handle.remove()
        detach_mole(pipe)
    return images, maps.shares()
