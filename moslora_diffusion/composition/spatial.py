"""The spatial methods behind `compose`: `regional` (the user's boxes / masks) and `auto` (masks from the trigger
words' cross-attention in the first steps), both through the spatial router (router.py), and `spatial_mole`
(per-position gates, spatial_mole.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..generation.text_to_image import GenerationRequest, run_pipeline
from ..mole import Expert
from .contexts import encode_branches
from .regions import CompositionError, Region, expert_masks, resize_weights, share_weights
from .router import SpatialRouter, attach_router, detach_router


def latent_size(pipe, req: GenerationRequest) -> tuple[int, int]:
    """(height, width) of the latents for the request's image size."""
    factor = int(pipe.vae_scale_factor)
    return req.height // factor, req.width // factor


def regional_shares(pipe, experts: Sequence[Expert], req: GenerationRequest, regions: Sequence[Region]
                    ) -> torch.Tensor:
    """(1, N, h, w) latent-size shares of the regions: the overlap rule at image size, then area-averaged."""
    masks = expert_masks(regions, [e.name for e in experts], req.width, req.height)
    shares = share_weights(torch.from_numpy(masks)[None])
    return resize_weights(shares, *latent_size(pipe, req))


def image_masks(shares: torch.Tensor, experts: Sequence[Expert], req: GenerationRequest, images: int
                ) -> list[dict[str, np.ndarray]]:
    """Per image {expert: (H, W) float32}: the latent-size shares the router used, each latent cell a block of
    pixels (nearest), so the picture shows exactly what was applied."""
    full = F.interpolate(shares.float().cpu(), size=(req.height, req.width), mode="nearest")
    full = full.expand(images, -1, -1, -1) if full.shape[0] == 1 else full
    return [{e.name: full[b, i].numpy().copy() for i, e in enumerate(experts)} for b in range(images)]


def routed_images(pipe, router: SpatialRouter, req: GenerationRequest, shares: torch.Tensor,
                  prompts: Sequence[str | None], blend: str = "attention") -> list[Image.Image]:
    router.set_shares(shares.to(pipe._execution_device))
    embeddings = encode_branches(pipe, router, req, prompts)
    if blend == "attention":
        return run_pipeline(pipe, req, None, embeddings)
    from .latent_blend import latent_blend_forward
    from .one_at_a_time import replace_attribute

    undo = replace_attribute(pipe.unet, "forward", lambda original: latent_blend_forward(router, original))
    try:
        return run_pipeline(pipe, req, None, embeddings)
    finally:
        undo()


def generate_spatial(pipe, experts: Sequence[Expert], method: str, req: GenerationRequest,
                     regions: Sequence[Region], gates=None, **options) -> tuple[list[Image.Image], list[dict]]:
    """Images and per-image masks of a checked request (api.compose checked everything)."""
    if method == "spatial_mole":
        from .spatial_mole import generate_spatial_mole

        images, shares = generate_spatial_mole(pipe, experts, req, gates)
        return images, image_masks(shares, experts, req, len(images))
    router = attach_router(pipe, experts)
    try:
        if method == "regional":
            prompts = {r.expert: r.prompt for r in regions}
            shares = regional_shares(pipe, experts, req, regions)
            images = routed_images(pipe, router, req, shares, [prompts.get(e.name) for e in experts],
                                   options.get("blend", "attention"))
        elif method == "auto":
            from .auto import auto_shares

            shares = auto_shares(pipe, router, experts, req, **options)
            images = routed_images(pipe, router, req, shares, [None] * len(experts))
        else:
            raise CompositionError(f"method {method!r} is not a spatial method")
    finally:
        detach_router(pipe)
    return images, image_masks(shares, experts, req, len(images))
