"""Regions of an image for the spatial composition methods: a box or a mask per expert, optionally its own prompt.

A region says where one expert acts. At generation time every region becomes a (H, W) weight map in [0, 1] at
image size; the weight maps of all regions give, per position p, each expert's share w_i(p):

    w_i(p) = m_i(p) / max(1, sum_j m_j(p))            (the overlap rule)

so where regions overlap and their masks add up to more than 1 the experts share the position in proportion to
their masks (two full boxes overlapping: half each), and where they add up to at most 1 (soft edges, one region)
the masks are used as given. The rest, 1 - sum_i w_i(p), is the base model with the global prompt. Everything here
is plain numpy / torch and runs before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..mole.experts import MoLEError


class CompositionError(MoLEError):
    """Bad composition input (method, regions, masks, trigger words); one line, raised before the model loads."""


@dataclass(frozen=True)
class Region:
    """Where one expert acts. `box`: (x0, y0, x1, y1) as fractions of the width and height (0 <= x0 < x1 <= 1);
    `mask`: (H, W) float in [0, 1] at image size; exactly one of the two. `prompt`: the prompt the region's
    cross-attention reads instead of the global one (None: the global prompt)."""

    expert: str
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    prompt: str | None = None

    def describe(self) -> str:
        """How a PNG's parameters text records the region: `name: box 0,0,0.5,1` / `name: mask` (+ its prompt)."""
        where = "mask" if self.mask is not None else "box " + ",".join(f"{v:g}" for v in self.box)
        return f"{self.expert}: {where}" + (f" ({self.prompt})" if self.prompt else "")


def _check_box(region: Region) -> None:
    box = region.box
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise CompositionError(f"region of {region.expert!r}: a box is 4 numbers x0,y0,x1,y1, got {box!r}") from None
    if not all(np.isfinite([x0, y0, x1, y1])) or not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise CompositionError(f"region of {region.expert!r}: box {x0:g},{y0:g},{x1:g},{y1:g} must satisfy "
                               "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the width and height)")


def _check_mask(region: Region, size: tuple[int, int] | None) -> None:
    mask = region.mask
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        mask = mask.astype(np.float32)  # True = the region
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or not np.issubdtype(mask.dtype, np.number):
        shape = getattr(mask, "shape", type(mask).__name__)
        raise CompositionError(f"region of {region.expert!r}: a mask is a 2-D (height, width) array, got {shape}")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise CompositionError(f"region of {region.expert!r}: not a mask (values must lie in [0, 1]; a greyscale "
                               "PNG is read as value / 255)")
    if size is not None and tuple(mask.shape) != (size[1], size[0]):
        raise CompositionError(f"region of {region.expert!r}: the mask is {mask.shape[1]}x{mask.shape[0]} but the "
                               f"image is {size[0]}x{size[1]}; give a mask of the image's size")


# Below this (26/255), a mask file's brightest pixel gives its expert under a tenth of its scale anywhere: taken for
# a mistake on the command line; a soft mask brighter than this is used as given.
FAINTEST_MASK = 0.1


def check_mask_not_empty(mask: np.ndarray, where: str) -> None:
    """An all-black mask gives its expert no area: it was accepted and the expert silently never appeared (the
    mask counterpart of a zero-area box); one no brighter than FAINTEST_MASK is refused too. `where` names the
    mask, e.g. "--region_mask dog=dog.png". Only the command line's mask files are held to it: compose() keeps
    taking an all-zero mask (the base model there)."""
    brightest = float(np.max(np.asarray(mask), initial=0.0))
    if brightest == 0.0:
        raise CompositionError(f"{where}: the mask is empty (all black), so the expert would never appear: paint "
                               "the expert's region white")
    if brightest < FAINTEST_MASK:
        # A label picture saved as 0 / 1 (not 0 / 255) reads as 1/255: the expert at 0.4% of its scale, invisible.
        raise CompositionError(f"{where}: the mask's brightest pixel is {round(brightest * 255)}/255, so the expert "
                               "would barely act (a 0/1 label picture?): paint the expert's region white (255)")


def check_regions(regions: Sequence[Region], experts: Sequence[str], size: tuple[int, int] | None = None) -> None:
    """Every region names an expert that is there (once), has exactly one of box / mask, a valid box, a mask of
    the image's (width, height) `size` with values in [0, 1], and no empty prompt. CompositionError otherwise."""
    seen = set()
    for region in regions:
        if not isinstance(region, Region):
            raise CompositionError(f"regions are Region(expert, box=... or mask=..., prompt=...) objects, got "
                                   f"{type(region).__name__}")
        if region.expert not in experts:
            raise CompositionError(f"a region for expert {region.expert!r}, which is not there; the experts are "
                                   f"{', '.join(experts)}")
        if region.expert in seen:
            raise CompositionError(f"two regions for expert {region.expert!r}; give one box or mask per expert")
        seen.add(region.expert)
        if (region.box is None) == (region.mask is None):
            raise CompositionError(f"region of {region.expert!r}: give a box or a mask (exactly one)")
        if region.box is not None:
            _check_box(region)
        else:
            _check_mask(region, size)
        if region.prompt is not None and not region.prompt.strip():
            raise CompositionError(f"region of {region.expert!r}: an empty region prompt; give text or leave it out")


def region_mask(region: Region, width: int, height: int) -> np.ndarray:
    """(height, width) float32 in [0, 1]: the box rasterised (pixel centres inside it are 1) or the mask."""
    if region.mask is not None:
        return np.asarray(region.mask).astype(np.float32)
    x0, y0, x1, y1 = region.box
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    inside_x = (xs >= x0) & (xs < x1) | ((x1 == 1) & (xs >= x0))
    inside_y = (ys >= y0) & (ys < y1) | ((y1 == 1) & (ys >= y0))
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def expert_masks(regions: Sequence[Region], experts: Sequence[str], width: int, height: int) -> np.ndarray:
    """(N, H, W) float32: each expert's mask at image size (zeros for an expert without a region)."""
    out = np.zeros((len(experts), height, width), dtype=np.float32)
    for region in regions:
        out[list(experts).index(region.expert)] = region_mask(region, width, height)
    return out


def share_weights(masks: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) masks -> (B, N, H, W) shares w_i = m_i / max(1, sum_j m_j) (the overlap rule; sum <= 1)."""
    total = masks.sum(dim=1, keepdim=True).clamp_min(1.0)
    return masks / total


def give_rest_to(shares: torch.Tensor, index: int) -> torch.Tensor:
    """(B, N, H, W) shares with expert `index` (the background, which has no region) holding 1 - the others' sum
    (never below 0): where the regions leave room. In place; returns `shares`."""
    others = shares.sum(dim=1) - shares[:, index]
    shares[:, index] = (1.0 - others).clamp_min(0.0)
    return shares


def resize_weights(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, H, W) -> (B, N, height, width) by area averaging (a block's resolution; exact zeros stay zeros
    wherever the whole area under a position is 0)."""
    if weights.shape[-2:] == (height, width):
        return weights
    return F.adaptive_avg_pool2d(weights, (height, width))
