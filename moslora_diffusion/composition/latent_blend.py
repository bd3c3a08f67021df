"""Regional routing by blending noise predictions (`regional` with blend="latent"): each region is denoised by
its expert alone, reading its region prompt, in a frame centred on the region, and the step's prediction is put
together per latent position:

    eps(p) = (1 - sum_i w_i(p)) * eps_0(p) + sum_i w_i(p) * roll(eps_i(roll(x, -o_i)), o_i)(p)

eps_0: the base model reading the global prompt; eps_i: expert i alone (its delta times s_i in every layer it
adapts, its text-encoder delta in its prompt's encoding); w_i: its share of position p (regions.share_weights);
o_i: the offset (latent cells) from the latent's centre to the centre of expert i's region's bounding box.

This is latent-space regional prompting (A1111's Regional Prompter in latent mode, "latent couple") with one
LoRA per region. Why the centred frame: a DreamBooth expert learned its subject from photos where it stands
near the middle; asked for it "on the left" it mostly draws it in the middle anyway, and the left half of its
prediction holds half a subject. Rolling the latent so the region's centre is the frame's centre lets the expert
draw its subject where it learned to, and the blend keeps the part inside the region (what the roll wraps
around lands outside the region, where the expert's share is 0). So a region prompt names what is in the region,
not where ("a photo of sks star", not "... on the left"). Inside a region the expert acts alone: nothing of
another expert reaches its pixels through self-attention or cross-attention. The price: one UNet forward per
expert, plus the base's where the regions leave room (the attention blend costs one). SDXL's pooled prompt is
contexts.py's area mix for every branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .composite import unet_sample, with_sample
from .router import SpatialRouter


def frame_offsets(shares: torch.Tensor) -> list[tuple[int, int]]:
    """Per expert, (dy, dx) in latent cells from the latent's centre to the centre of the bounding box of its
    region (positions with a share > 0 in any image); (0, 0) for an expert without a region."""
    height, width = shares.shape[-2:]
    out = []
    for i in range(shares.shape[1]):
        rows, cols = torch.nonzero(shares[:, i].amax(dim=0) > 0, as_tuple=True)
        if rows.numel() == 0:
            out.append((0, 0))
            continue
        cy = (int(rows.min()) + int(rows.max()) + 1) / 2
        cx = (int(cols.min()) + int(cols.max()) + 1) / 2
        out.append((round(cy - height / 2), round(cx - width / 2)))
    return out


def latent_blend_forward(router: SpatialRouter, original: Callable) -> Callable:
    """A stand-in for the UNet's forward: one forward per branch (the base only where the regions leave room),
    predictions blended by the router's shares at the latent's size. Needs the router's contexts set."""
    offsets_at: dict[tuple, list[tuple[int, int]]] = {}  # the regions do not move between steps

    def forward(sample, *args, **kwargs):
        shares = router.shares_at(sample.shape[0], *sample.shape[-2:])  # (B, N, h, w)
        rest = (1.0 - shares.sum(dim=1, keepdim=True)).clamp_min(0.0)  # the base model's share
        key = tuple(shares.shape)
        if key not in offsets_at:
            offsets_at[key] = frame_offsets(shares)
        offsets = offsets_at[key]

        def branch(index: int):
            router.branch, router.whole_branch = index, True
            call = dict(kwargs)
            context = router.contexts[index] if index < len(router.contexts) else None
            if context is not None:
                call["encoder_hidden_states"] = context.to(sample.device)
            dy, dx = offsets[index - 1] if index > 0 else (0, 0)
            try:
                if (dy, dx) == (0, 0):
                    return original(sample, *args, **call)
                output = original(torch.roll(sample, (-dy, -dx), dims=(-2, -1)), *args, **call)
                return with_sample(output, torch.roll(unet_sample(output), (dy, dx), dims=(-2, -1)))
            finally:
                router.branch, router.whole_branch = None, False

        total, output = None, None
        parts = [(0, rest)] + [(i + 1, shares[:, i:i + 1]) for i in range(shares.shape[1])]
        for index, weight in parts:
            if not bool((weight > 0).any()):
                continue  # no position of this branch: its forward is skipped
            output = branch(index)
            term = weight * unet_sample(output).float()
            total = term if total is None else total + term
        if output is None:  # no share anywhere: the base model
            return branch(0)
        return with_sample(output, total.to(unet_sample(output).dtype))
    return forward
