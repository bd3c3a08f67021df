"""The prompt of every branch of a spatial composition, encoded once per generation.

Branch 0 is the base model reading the global prompt; branch 1 + i is expert i (its text-encoder deltas at full
scale, the others off) reading its region prompt, or the global prompt when its region has none. The pipeline
gets branch 0 as `prompt_embeds` (batch 1, it repeats them per image); the router gets every expert branch as the
UNet sees its conditioning: (negative; prompt) stacked when classifier-free guidance runs, one row per image.
SDXL's pooled prompt embedding (the added time conditioning, which has no position) is the base one moved towards
each expert's by that expert's share of the image area: a whole-image region gives the expert's, none the base's.
SD 1.x / 2.x and SDXL alike, through the pipeline's own `encode_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..generation.text_to_image import GenerationRequest
from .router import SpatialRouter


def uses_guidance(pipe, req: GenerationRequest) -> bool:
    """What the pipeline decides (`do_classifier_free_guidance`): guidance above 1 and no guidance-embedded UNet."""
    return req.guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


@torch.no_grad()
def _encode(pipe, prompt: str, negative: str, images: int, guidance: bool):
    out = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device, num_images_per_prompt=images,
                             do_classifier_free_guidance=guidance, negative_prompt=negative or None)
    return out if len(out) == 4 else (*out, None, None)  # SDXL adds the pooled embeddings


def _branch(router: SpatialRouter, branch: int, pipe, prompt: str, negative: str, images: int, guidance: bool):
    router.branch = branch
    try:
        return _encode(pipe, prompt, negative, images, guidance)
    finally:
        router.branch = None


def encode_branches(pipe, router: SpatialRouter, req: GenerationRequest, prompts: Sequence[str | None]) -> dict:
    """Sets the router's branch contexts (`prompts`: one per expert, None = the global prompt) and returns the
    pipeline's keyword arguments for branch 0 (prompt_embeds, negative_prompt_embeds, SDXL's pooled ones)."""
    guidance = uses_guidance(pipe, req)
    positive, negative, pooled, negative_pooled = _branch(router, 0, pipe, req.prompt, req.negative_prompt, 1,
                                                          guidance)
    contexts: list[torch.Tensor | None] = [None]
    area = router.shares.mean(dim=(0, 2, 3))  # (N,) each expert's share of the images
    for i, prompt in enumerate(prompts):
        pos, neg, pos_pooled, neg_pooled = _branch(router, i + 1, pipe, prompt or req.prompt, req.negative_prompt,
                                                   req.num_images, guidance)
        contexts.append(torch.cat([neg, pos]) if guidance else pos)
        if pooled is not None:  # SDXL's pooled prompt has no position: mixed by area, as every such input
            pooled = pooled + area[i].to(pooled) * (pos_pooled[:1] - pooled)
            if negative_pooled is not None:
                negative_pooled = negative_pooled + area[i].to(pooled) * (neg_pooled[:1] - negative_pooled)
    router.set_contexts(contexts)
    kwargs = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
    if pooled is not None:
        kwargs |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return kwargs
