"""Regional routing by inpainting (`regional` with blend="inpaint"): one region after another, each drawn over the
picture so far. This is what users do by hand (draw a layout, then inpaint each subject into it), run as one call.

1. The host draws the whole picture alone. The host is the `background` expert when there is one (unrolled,
   reading the global prompt). Otherwise it is the first region's expert in the order the regions were given, in
   its frame, reading its region prompt (else the global prompt). When no region has any area, the host is the
   base model with the global prompt.
2. Every other region's expert, in order, is drawn alone in its frame. After every denoising step, the latent
   outside its region is set back to the picture so far at that same step (the previous pass's recorded latents):
   `x(p) = w(p) x_expert(p) + (1 - w(p)) x_before(p)`, so where its share w is 0 the expert changes nothing, bit
   for bit. With `fit_steps` the region shrinks after that many steps to the expert's subject
   (latent_blend.silhouettes, from its guided prediction of the clean latent), and the picture so far keeps its
   background all around the subject.

Why: alone, each subject's expert draws on a clean background of its own. The latent blend puts those side by
side (two backgrounds and a seam), or, fitted, has the base model repaint one background (in any colour or
texture when the prompt names none). Here the host's own background stays behind every subject, and each later
expert sees it around its region and continues it.

Frames: latent_blend.frame_offsets, pulled towards the image's centre by FRAME_PULL of the distance. A box at the
image's edge centres its frame near that edge, and a subject drawn at its learned size then runs into the border.
Frames pulled halfway keep it inside. The pull was chosen on the composition benchmark's validation split (0,
0.25 and 0.5 screened).

Cost: one UNet forward a step per pass, so N passes (the host and N - 1 others) cost N x the base model. Each
pass decodes its images. Like the latent blend, SDXL's pooled prompt is contexts.py's area mix for every branch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..generation.text_to_image import GenerationRequest, run_pipeline
from . import latent_blend
from .latent_blend import branch_forward, frame_offsets, guided, predicted_clean, silhouettes
from .one_at_a_time import replace_attribute
from .router import SpatialRouter

# How far each frame's centre moves from its region's centre towards the image's centre (share of the distance).
FRAME_PULL = 0.5


def pass_order(shares: torch.Tensor, order: Sequence[int], background: int | None) -> tuple[int | None, list[int]]:
    """(the host, None for the base model; the experts drawn over it in turn). shares: (B, N, h, w); order: the
    experts' indices in the order their regions were given. An expert whose region has no area is not drawn."""
    drawn = [i for i in order if bool((shares[:, i] > 0).any())]
    host = background if background is not None else (drawn[0] if drawn else None)
    return host, [i for i in drawn if i != host]


class _Pass:
    """One pipeline run with a single branch (0: the base model, 1 + i: expert i) in its frame. With `before` (the
    previous pass's latents after each step), after every step the latents outside `region` ((B, 1, h, w) shares)
    are set back to those; `fit_step` shrinks the region to the expert's silhouette after that many steps."""

    def __init__(self, router: SpatialRouter, req: GenerationRequest, branch: int, offset: tuple[int, int],
                 before: list[torch.Tensor] | None = None, region: torch.Tensor | None = None,
                 fit_step: int | None = None, threshold: float | None = None):
        self.router, self.req, self.branch, self.offset = router, req, branch, offset
        self.before, self.region, self.fit_step = before, region, fit_step
        self.threshold = latent_blend.DEFAULT_FIT_THRESHOLD if threshold is None else threshold  # as the latent blend
        self.step, self.x0 = 0, None
        self.latents: list[torch.Tensor] = []  # after every step, as the next step continues from them

    def forward(self, original: Callable) -> Callable:
        def unet(sample, *args, **kwargs):
            output = branch_forward(self.router, original, self.branch, sample, self.offset, args, kwargs)
            if self._fits_now() and self.x0 is None:
                timestep = args[0] if args else kwargs.get("timestep")
                images, scale = self.req.num_images, self.req.guidance
                prediction = output[0] if isinstance(output, tuple) else output.sample
                self.x0 = predicted_clean(self.router.pipe.scheduler, guided(sample, images, scale), timestep,
                                          guided(prediction, images, scale))
            return output
        return unet

    def _fits_now(self) -> bool:
        return (self.fit_step is not None and self.region is not None and self.step + 1 == self.fit_step
                and not bool((self.region > 0).all()))  # a whole-image region is that expert alone: never fitted

    def step_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        if self.before is not None:
            if self._fits_now() and self.x0 is not None:
                inside = silhouettes(self.x0, self.region[:, 0] > 0, self.threshold)
                self.region = self.region * inside[:, None].to(self.region.dtype)
            share = self.region.to(latents.device, latents.dtype)
            latents = share * latents + (1 - share) * self.before[step].to(latents.dtype)
        self.latents.append(latents.detach().clone())
        self.step = step + 1
        return latents

    def run(self, pipe, embeddings: dict) -> list[Image.Image]:
        undo = replace_attribute(pipe.unet, "forward", self.forward)
        try:
            return run_pipeline(pipe, self.req, None, embeddings, self.step_latents)
        finally:
            undo()


def inpaint_images(pipe, router: SpatialRouter, req: GenerationRequest, shares: torch.Tensor, embeddings: dict,
                   order: Sequence[int], fit_steps: int | None = None, background: int | None = None
                   ) -> tuple[list[Image.Image], torch.Tensor]:
    """Images and the (B_images, N, h, w) shares each expert drew last (the host: all the others left).

    shares: (1 or B, N, h, w) at the latent's size (spatial.regional_shares; a background expert's share is
    ignored: it hosts); embeddings: contexts.encode_branches' (router.contexts set); order: the experts' indices
    in the order their regions were given."""
    images = req.num_images
    shares = shares.float().to(pipe._execution_device).expand(images, -1, -1, -1)
    offsets = frame_offsets(shares, FRAME_PULL)
    host, others = pass_order(shares, order, background)
    host_offset = (0, 0) if host is None or host == background else offsets[host]
    last = _Pass(router, req, 0 if host is None else host + 1, host_offset)
    pictures = last.run(pipe, embeddings)
    drawn = torch.zeros_like(shares)
    for i in others:
        last = _Pass(router, req, i + 1, offsets[i], last.latents, shares[:, i:i + 1].clone(), fit_steps)
        pictures = last.run(pipe, embeddings)
        drawn[:, i] = last.region[:, 0]
    if host is not None:
        drawn[:, host] = (1 - drawn.sum(dim=1)).clamp_min(0)
    return pictures, drawn.cpu()
