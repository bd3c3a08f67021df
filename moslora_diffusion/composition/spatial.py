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
from .regions import CompositionError, Region, expert_masks, give_rest_to, resize_weights, share_weights
from .router import SpatialRouter, attach_router, detach_router


def latent_size(pipe, req: GenerationRequest) -> tuple[int, int]:
    """(height, width) of the latents for the request's image size."""
    factor = int(pipe.vae_scale_factor)
    return req.height // factor, req.width // factor


def regional_shares(pipe, experts: Sequence[Expert], req: GenerationRequest, regions: Sequence[Region],
                    background: int | None = None) -> torch.Tensor:
    """(1, N, h, w) latent-size shares of the regions: the overlap rule at image size, then area-averaged; the
    `background` expert (an index; it has no region) takes what the regions leave, 1 - their shares' sum."""
    masks = expert_masks(regions, [e.name for e in experts], req.width, req.height)
    shares = resize_weights(share_weights(torch.from_numpy(masks)[None]), *latent_size(pipe, req))
    return shares if background is None else give_rest_to(shares, background)


def image_masks(shares: torch.Tensor, experts: Sequence[Expert], req: GenerationRequest, images: int
                ) -> list[dict[str, np.ndarray]]:
    """Per image {expert: (H, W) float32}: the latent-size shares the router used, each latent cell a block of
    pixels (nearest), so the picture shows exactly what was applied."""
    full = F.interpolate(shares.float().cpu(), size=(req.height, req.width), mode="nearest")
    full = full.expand(images, -1, -1, -1) if full.shape[0] == 1 else full
    return [{e.name: full[b, i].numpy().copy() for i, e in enumerate(experts)} for b in range(images)]


def routed_images(pipe, router: SpatialRouter, req: GenerationRequest, shares: torch.Tensor,
                  prompts: Sequence[str | None], blend: str = "attention", fit_steps: int | None = None,
                  background: int | None = None, order: Sequence[int] | None = None
                  ) -> tuple[list[Image.Image], torch.Tensor]:
    """Images and the (B_images or 1, N, h, w) shares applied last (the fitted ones when `fit_steps` is set).
    order: the experts' indices in the order their regions were given (the inpaint blend draws them so)."""
    router.set_shares(shares.to(pipe._execution_device))
    embeddings = encode_branches(pipe, router, req, prompts)
    if blend == "attention":
        return run_pipeline(pipe, req, None, embeddings), shares
    if blend == "inpaint":
        from .inpaint_blend import inpaint_images

        order = range(shares.shape[1]) if order is None else order
        return inpaint_images(pipe, router, req, shares, embeddings, order, fit_steps, background)
    from .latent_blend import LatentBlend
    from .one_at_a_time import replace_attribute

    blender = LatentBlend(router, req.num_images, req.guidance, fit_steps, background)
    undo = replace_attribute(pipe.unet, "forward", blender.wrap)
    try:
        images = run_pipeline(pipe, req, None, embeddings)
    finally:
        undo()
    final = shares if blender.fitted is None else blender.fitted[:req.num_images].cpu()
    return images, final


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
            prompts, names = {r.expert: r.prompt for r in regions}, [e.name for e in experts]
            background = names.index(options["background"]) if options.get("background") else None
            shares = regional_shares(pipe, experts, req, regions, background)
            images, shares = routed_images(pipe, router, req, shares, [prompts.get(n) for n in names],
                                           options.get("blend", "attention"), options.get("fit_steps"), background,
                                           [names.index(r.expert) for r in regions])
        elif method == "auto":
            from .auto import auto_shares

            shares = auto_shares(pipe, router, experts, req, **options)
            images, shares = routed_images(pipe, router, req, shares, [None] * len(experts))
        else:
            raise CompositionError(f"method {method!r} is not a spatial method")
    finally:
        detach_router(pipe)
    return images, image_masks(shares, experts, req, len(images))
