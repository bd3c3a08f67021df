"""`compose`: every way of putting several experts into one image, behind one call.

    from moslora_diffusion.composition import compose, Region
    experts = mole.load_experts(pipe, ["out/star", "out/square"])
    result = compose(pipe, experts, "regional", GenerationRequest("sks star and v square", width=64, height=64),
                     regions=[Region("star", box=(0, 0, 0.5, 1)), Region("square", box=(0.5, 0, 1, 1))])
    result.images[0]; result.masks[0]["star"]            # (H, W) float in [0, 1]: where the star expert acted

Methods (METHODS): whole-image `sum`, `nla`, `mole` (per-block gates), `switch` (LoRA Switch) and `composite`
(LoRA Composite, Zhong et al., arXiv 2402.16843); spatial `regional` (user boxes / masks), `auto` (masks from the
trigger words' cross-attention in the first steps, FreeFuse-like, arXiv 2510.23515) and `spatial_mole` (gates per
position). Every input is checked by `check_layout` before the pipeline is touched (CompositionError, one line).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..generation.text_to_image import GenerationRequest, make_scheduler, validate_request
from ..mole import Expert
from .regions import CompositionError, Region, check_regions, expert_masks, region_mask

METHODS = ("sum", "nla", "mole", "switch", "composite", "regional", "auto", "spatial_mole")
LAYOUT_METHODS = ("regional",)  # the methods that take user regions
GATED_METHODS = ("mole", "spatial_mole")  # the methods that take a gate_state
OPTIONS = {"switch": {"every"}, "auto": {"triggers", "auto_steps", "threshold"},
           "regional": {"blend", "fit_steps", "background"}}
# regional: blend cross-attention outputs (router.py) or predictions (latent_blend.py), or draw one region after
# another over the picture so far (inpaint_blend.py)
BLENDS = ("attention", "latent", "inpaint")
FITTED_BLENDS = ("latent", "inpaint")  # the blends that draw each subject with its expert alone, so can fit it


@dataclass
class CompositionResult:
    """images: one per seed of the request; masks: per image {expert name: (H, W) float32 in [0, 1]}, the
    regions each expert acted in (None for the whole-image methods); gate_report: {block: N weights} (mole)."""

    method: str
    images: list[Image.Image]
    masks: list[dict[str, np.ndarray]] | None = None
    gate_report: dict[str, list[float]] | None = None
    regions: list[Region] = field(default_factory=list)


def check_background(experts: Sequence[str], regions: Sequence[Region], options: Mapping, steps: int | None,
                     size: tuple[int, int] | None = None) -> None:
    """regional's `background` (an expert that draws wherever the regions leave room and reads the global prompt,
    so it takes no region of its own, and needs room: some region that is not the whole image) and `fit_steps`
    (latent or inpaint blend only: 1 <= fit_steps < steps, and some region to fit). CompositionError, one line."""
    background, fit_steps = options.get("background"), options.get("fit_steps")
    if background is not None and background not in experts:
        raise CompositionError(f"background {background!r} is not one of the experts ({', '.join(experts)})")
    if fit_steps is not None:
        if options.get("blend", "attention") not in FITTED_BLENDS:
            raise CompositionError("fit_steps needs --blend latent or inpaint: only they draw each subject with its "
                                   "expert alone, which is what finds the subject's outline")
        if steps is not None and steps < 2:
            raise CompositionError(f"fit_steps needs at least 2 denoising steps (this run has {steps}): the "
                                   "regions are fitted after some steps and the rest are drawn fitted")
        if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 1 or (
                steps is not None and fit_steps >= steps):
            limit = f" and below the {steps} denoising steps" if steps is not None else ""
            raise CompositionError(f"fit_steps {fit_steps!r}: give a whole number of steps, at least 1{limit}")
    if background is None and fit_steps is None:
        return
    width, height = size or next((r.mask.shape[::-1] for r in regions if r.mask is not None), (64, 64))
    masks = expert_masks(regions, list(experts), width, height)  # every region as drawn: the overlap rule
    room = float(np.clip(1.0 - masks.sum(axis=0), 0, 1).max()) > 0  # somewhere the regions leave room
    whole = [r.expert for r in regions if float(region_mask(r, width, height).min()) > 0]  # as latent_blend._fit
    if background is not None and not room and fit_steps is None:
        raise CompositionError(f"the regions cover the whole image, so the background {background!r} would draw "
                               "nothing: make a region smaller, add --fit_steps (latent blend), or leave the "
                               "background out")
    if fit_steps is not None and len(whole) == len(regions):
        raise CompositionError("fit_steps has nothing to fit: every region covers the whole image, and a "
                               "whole-image region stays its expert alone; give boxes, or leave fit_steps out")


def _check_background_regions(regions: Sequence[Region], options: Mapping) -> None:
    background = options.get("background")
    if background is not None and any(r.expert == background for r in regions):
        raise CompositionError(f"{background!r} is the background: it draws wherever the other regions leave room "
                               "and reads the global prompt; give it no region or region prompt of its own (or "
                               "no background)")


def check_layout(method: str, experts: Sequence[str], regions: Sequence[Region] = (), size: tuple[int, int] | None
                 = None, options: Mapping | None = None, has_gates: bool = False, steps: int | None = None) -> None:
    """Everything about a composition that can be checked without a model: the method, its options, a layout on
    a method that takes none, the regions (check_regions; overlaps are allowed: see regions.py for the rule),
    regional's background and fit_steps (check_background), gates on a method that takes none. `size`: (width,
    height) of the image; `steps`: the denoising steps. CompositionError, one line."""
    if method not in METHODS:
        raise CompositionError(f"unknown composition method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options or {}) - OPTIONS.get(method, set()))
    if unknown:
        raise CompositionError(f"method {method!r} takes no option {', '.join(unknown)}"
                               + (f" (its options: {', '.join(sorted(OPTIONS[method]))})" if method in OPTIONS else ""))
    blend = (options or {}).get("blend", "attention")
    if blend not in BLENDS:
        raise CompositionError(f"blend {blend!r}: choose {', '.join(BLENDS[:-1])} or {BLENDS[-1]}")
    if regions and method not in LAYOUT_METHODS:
        raise CompositionError(f"method {method!r} takes no regions (boxes, masks or region prompts); use "
                               f"--method regional for a layout, or leave the regions out")
    if method in LAYOUT_METHODS:
        _check_background_regions(regions, options or {})
    if method in LAYOUT_METHODS and not regions:
        extra = " (the background draws around the regions)" if (options or {}).get("background") else ""
        raise CompositionError(f"method {method!r} needs at least one region: a box or mask per expert{extra}")
    if has_gates and method not in GATED_METHODS:
        raise CompositionError(f"method {method!r} takes no gates; gates are for {' and '.join(GATED_METHODS)}")
    check_regions(regions, experts, size)
    if method in LAYOUT_METHODS:
        check_background(experts, regions, options or {}, steps, size)


def _not_available(method: str, owner: str):
    raise CompositionError(f"method {method!r} is not available in this build ({owner} is missing)")


def _dispatch(pipe, experts: Sequence[Expert], method: str, req: GenerationRequest, regions: Sequence[Region],
              gates, options: dict) -> CompositionResult:
    from .baselines import generate_gated, generate_weighted

    if method in ("sum", "nla"):
        return CompositionResult(method, generate_weighted(pipe, experts, req, normalise=method == "nla"))
    if method == "mole":
        images, report = generate_gated(pipe, experts, req, gates)
        return CompositionResult(method, images, gate_report=report)
    if method == "switch":
        try:
            from .switch import generate_switch
        except ImportError:
            _not_available(method, "composition/switch.py")
        return CompositionResult(method, generate_switch(pipe, experts, req, **options))
    if method == "composite":
        try:
            from .composite import generate_composite
        except ImportError:
            _not_available(method, "composition/composite.py")
        return CompositionResult(method, generate_composite(pipe, experts, req))
    return _spatial(pipe, experts, method, req, regions, gates, options)


def _spatial(pipe, experts, method, req, regions, gates, options) -> CompositionResult:
    try:
        from .spatial import generate_spatial
    except ImportError:
        _not_available(method, "composition/spatial.py")
    images, masks = generate_spatial(pipe, experts, method, req, regions, gates, **options)
    return CompositionResult(method, images, masks, regions=list(regions))


def compose(pipe, experts: Sequence[Expert], method: str, request: GenerationRequest, regions: Sequence[Region] = (),
            gates: Mapping[str, torch.Tensor] | None = None, **options) -> CompositionResult:
    """Images of `request` (prompt, seed, steps, guidance, size, scheduler, num_images) with `experts` (from
    mole.load_experts, each with its scale s_i) composed by `method` (METHODS).

    regions: Region per expert (method "regional" only). gates: a MoLE gate_state (methods "mole" and
    "spatial_mole"; None: uniform gates). options: `every` (switch: denoising steps per expert), `triggers`
    ({expert: word}, auto), `auto_steps` (auto: steps whose cross-attention gives the masks), `threshold` (auto),
    `blend` (regional: "attention", the default; "latent": latent_blend.py; "inpaint": inpaint_blend.py, one
    region after another over the picture so far), `background` (regional: the expert that draws wherever the
    regions leave room, instead of the base model; it takes no region), `fit_steps` (regional, latent or inpaint
    blend: after this many steps each region shrinks to its subject's silhouette, the rest going to the background).
    Raises CompositionError / GenerationError (one line) before the pipeline is touched. The pipeline keeps the
    request's scheduler; otherwise it computes exactly what it did before (no weight changed, no hook left).
    """
    if not experts:
        raise CompositionError("no experts to compose: give at least one (mole.load_experts(pipe, paths, minimum=1))")
    check_layout(method, [e.name for e in experts], regions, (request.width, request.height), options,
                 gates is not None, request.steps)
    if method == "auto":
        from .auto import check_auto_options, expert_triggers

        check_auto_options(request.steps, **options)
        expert_triggers(experts, request.prompt, options.get("triggers"))
    req = validate_request(request, [])
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    return _dispatch(pipe, experts, method, req, regions, gates, dict(options))
