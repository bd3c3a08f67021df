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

Fitting (`fit_steps`, `background`). With boxes, each expert also paints its own background over its whole box,
so two subjects stand on two backgrounds with a seam between them, and a background expert never reaches the
boxes. After `fit_steps` steps (the boxes have fixed where and how big each subject is) every region but the
background's shrinks to its subject's silhouette (`silhouettes`: where the expert's predicted clean latent stands
out from the region's edge), and every position a region gives up goes to the background: the base model with
the global prompt, or the `background` expert, which draws wherever the regions leave room, unrolled (a
background has no centre). From then on one model draws one background around every subject. A region over the
whole image is not fitted: it stays that expert alone (there is nothing around it to give away).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .composite import unet_sample, with_sample
from .regions import give_rest_to
from .router import SpatialRouter

# silhouettes' threshold, chosen on the composition benchmark's validation split (0.2, 0.35 and 0.5 screened)
DEFAULT_FIT_THRESHOLD = 0.35
# The fit step as a share of the denoising steps where a caller picks it (the app's fitted blend): 6 of 20, the
# composition benchmark's validation choice.
FIT_SHARE = 0.3


def fit_steps_for(steps: int, share: float = FIT_SHARE) -> int:
    """`share` of `steps` denoising steps, at least 1 and below `steps` (fitting needs steps >= 2)."""
    return min(max(1, round(share * steps)), max(1, steps - 1))


def frame_offsets(shares: torch.Tensor, pull: float = 0.0) -> list[tuple[int, int]]:
    """Per expert, (dy, dx) in latent cells from the latent's centre to the centre of the bounding box of its
    region (positions with a share > 0 in any image), moved towards the latent's centre by `pull` (0..1) of that
    distance; (0, 0) for an expert without a region."""
    height, width = shares.shape[-2:]
    out = []
    for i in range(shares.shape[1]):
        rows, cols = torch.nonzero(shares[:, i].amax(dim=0) > 0, as_tuple=True)
        if rows.numel() == 0:
            out.append((0, 0))
            continue
        cy = (int(rows.min()) + int(rows.max()) + 1) / 2
        cx = (int(cols.min()) + int(cols.max()) + 1) / 2
        out.append((round((cy - height / 2) * (1 - pull)), round((cx - width / 2) * (1 - pull))))
    return out


def silhouettes(x0: torch.Tensor, regions: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, H, W) bool: where one expert drew its subject inside its region, from its predicted clean latent.

    x0: (B, C, H, W), the expert's prediction of the clean latent; regions: (B, H, W) bool, its region. The
    region's background is the median latent over the region's edge cells (a subject drawn in the middle of its
    frame leaves them to the background); a cell belongs to the subject when its distance to that background is at
    least `threshold` times the largest distance in the region; the result grows by one cell (the subject's
    outline), stays inside the region, and is the whole region where nothing stands out (no subject drawn)."""
    inside = regions.float()[:, None]
    # A cell is on the region's edge when a neighbour (or the image's border) is outside the region.
    eroded = -F.max_pool2d(-F.pad(inside, (1, 1, 1, 1), value=0.0), 3, stride=1)
    edge = (inside - eroded)[:, 0] > 0
    out = torch.zeros_like(regions)
    for b in range(x0.shape[0]):
        if not bool(edge[b].any()):
            continue
        background = x0[b][:, edge[b]].median(dim=1).values  # (C,)
        distance = (x0[b] - background[:, None, None]).norm(dim=0) * regions[b]
        peak = distance.max()
        if peak <= 0:
            out[b] = regions[b]
            continue
        subject = (distance >= threshold * peak).float()[None, None]
        grown = F.max_pool2d(subject, 3, stride=1, padding=1)[0, 0] > 0
        out[b] = grown & regions[b]
    return out


def predicted_clean(scheduler, sample: torch.Tensor, timestep, prediction: torch.Tensor) -> torch.Tensor:
    """x0 from the UNet's input (variance-preserving scale, as every diffusers scheduler hands it) and prediction
    ("epsilon" or "v_prediction", the scheduler's config), with alpha-bar of the nearest training timestep."""
    alphas = scheduler.alphas_cumprod
    index = int(round(float(torch.as_tensor(timestep).flatten()[0])))
    a = alphas[min(max(index, 0), len(alphas) - 1)].to(sample.device, torch.float32)
    sample, prediction = sample.float(), prediction.float()
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * prediction
    return (sample - (1 - a).sqrt() * prediction) / a.sqrt()


def branch_forward(router: SpatialRouter, original: Callable, index: int, sample: torch.Tensor,
                   offset: tuple[int, int], args: tuple, kwargs: dict):
    """One UNet forward of branch `index` alone (0: the base model with the global prompt; 1 + i: expert i with
    its region prompt's encoding from router.contexts) in a frame rolled by `offset` (latent cells), the output
    rolled back. Needs the router's contexts set (contexts.encode_branches)."""
    router.branch, router.whole_branch = index, True
    call = dict(kwargs)
    context = router.contexts[index] if index < len(router.contexts) else None
    if context is not None:
        call["encoder_hidden_states"] = context.to(sample.device)
    dy, dx = offset
    try:
        if (dy, dx) == (0, 0):
            return original(sample, *args, **call)
        output = original(torch.roll(sample, (-dy, -dx), dims=(-2, -1)), *args, **call)
        return with_sample(output, torch.roll(unet_sample(output), (dy, dx), dims=(-2, -1)))
    finally:
        router.branch, router.whole_branch = None, False


def guided(tensor: torch.Tensor, images: int, guidance: float) -> torch.Tensor:
    """(images, ...) the guided combination of a [negative; positive] batch (the batch itself without)."""
    if tensor.shape[0] == 2 * images:
        negative, positive = tensor[:images], tensor[images:]
        return negative + guidance * (positive - negative)
    return tensor


class LatentBlend:
    """A stand-in for the UNet's forward (`wrap(original)`): one forward per branch (the base only where the
    regions leave room), predictions blended by the shares at the latent's size. Needs the router's contexts set.

    fit_step: after this many denoising steps each fitted expert's region shrinks to its silhouette (`silhouettes`,
    from its guided prediction of the clean latent) and the positions it leaves go to `background` (an expert
    index, or None: the base model with the global prompt). images / guidance: the request's, to find the
    guided prediction in the pipeline's [negative; positive] batch.
    """

    def __init__(self, router: SpatialRouter, images: int, guidance: float, fit_step: int | None = None,
                 background: int | None = None, threshold: float | None = None):
        self.router, self.images, self.guidance = router, images, guidance
        self.fit_step, self.background = fit_step, background
        self.threshold = DEFAULT_FIT_THRESHOLD if threshold is None else threshold
        self.step, self.fitted = 0, None  # fitted: (B, N, h, w) shares from fit_step on
        self._offsets: dict[tuple, list[tuple[int, int]]] = {}  # the frames stay where the regions first put them

    def wrap(self, original: Callable) -> Callable:
        def forward(sample, *args, **kwargs):
            return self._forward(original, sample, args, kwargs)
        return forward

    def _forward(self, original, sample, args, kwargs):
        given = self.router.shares_at(sample.shape[0], *sample.shape[-2:])  # (B, N, h, w)
        key = tuple(given.shape)
        if key not in self._offsets:
            self._offsets[key] = frame_offsets(given)
            if self.background is not None:
                self._offsets[key][self.background] = (0, 0)
        offsets = self._offsets[key]
        shares = self.fitted if self.fitted is not None and self.fitted.shape == given.shape else given
        rest = (1.0 - shares.sum(dim=1, keepdim=True)).clamp_min(0.0)  # the base model's share
        fit_now = self.fit_step is not None and self.fitted is None and self.step + 1 >= self.fit_step
        total, output, predictions = None, None, {}
        parts = [(0, rest)] + [(i + 1, shares[:, i:i + 1]) for i in range(shares.shape[1])]
        for index, weight in parts:
            if not bool((weight > 0).any()):
                continue  # no position of this branch: its forward is skipped
            offset = offsets[index - 1] if index else (0, 0)
            output = branch_forward(self.router, original, index, sample, offset, args, kwargs)
            predictions[index] = unet_sample(output)
            term = weight * unet_sample(output).float()
            total = term if total is None else total + term
        if output is None:  # no share anywhere: the base model
            return branch_forward(self.router, original, 0, sample, (0, 0), args, kwargs)
        if fit_now:
            timestep = args[0] if args else kwargs.get("timestep")
            self.fitted = self._fit(given, sample, timestep, predictions)
        self.step += 1
        return with_sample(output, total.to(unet_sample(output).dtype))

    def _fit(self, given, sample, timestep, predictions) -> torch.Tensor:
        scheduler = self.router.pipe.scheduler
        fitted = given[:self.images].clone()  # (B_images, N, h, w): the halves of a guided batch are equal
        regions = fitted > 0
        for i in range(given.shape[1]):
            if i == self.background or (i + 1) not in predictions or bool(regions[:, i].all()):
                continue  # a whole-image region is that expert alone: nothing around it to give to a background
            x0 = predicted_clean(scheduler, guided(sample, self.images, self.guidance), timestep,
                                 guided(predictions[i + 1], self.images, self.guidance))
            fitted[:, i] = fitted[:, i] * silhouettes(x0, regions[:, i], self.threshold)
        if self.background is not None:
            give_rest_to(fitted, self.background)
        return fitted.repeat(given.shape[0] // fitted.shape[0], 1, 1, 1)

