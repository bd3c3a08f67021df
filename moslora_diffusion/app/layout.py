"""The Compose tab's layout: where each loaded adapter (an expert) acts, composed by `composition.compose`.

Per expert slot: an adapter, where it acts (a preset half or quarter, the whole image, a typed box, an uploaded
mask, "background": wherever the other regions leave room, or "automatic": found from its trigger word), an optional
region prompt and its scale; one method for the layout (composition.METHODS; regional's latent blend, plain or
fitted, as choices of their own). The app's pipeline holds the fused sliders in its weights, so a layout runs on the
base weights: the fusion lock is held, every fused scale set to 0, compose() runs, the scales are written back
(the same bit-for-bit restore as MoLE mode, compose.py). The PNG text records the whole layout (`Layout:` JSON; an
uploaded mask by the name of its copy under outputs/masks/), so pasting it back reproduces the image bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from ..composition import LAYOUT_METHODS, METHODS, CompositionError, Region, check_layout
from ..composition.latent_blend import FIT_SHARE, fit_steps_for
from ..composition.report import mask_picture, read_mask_picture
from ..files.atomic import save_image
from ..generation.text_to_image import GenerationRequest, make_scheduler

PRESETS = {"left half": (0, 0, 0.5, 1), "right half": (0.5, 0, 1, 1), "top half": (0, 0, 1, 0.5),
           "bottom half": (0, 0.5, 1, 1), "top-left quarter": (0, 0, 0.5, 0.5), "top-right quarter": (0.5, 0, 1, 0.5),
           "bottom-left quarter": (0, 0.5, 0.5, 1), "bottom-right quarter": (0.5, 0.5, 1, 1),
           "whole image": (0, 0, 1, 1)}
BACKGROUND = "background"  # regional: this expert draws wherever the other regions leave room (no region of its own)
WHERE = (*PRESETS, "box", "mask", BACKGROUND, "automatic")
MASKS = "masks"  # outputs/masks/<sha256 of the mask's PNG bytes>.png: uploaded masks, named in the PNG text


@dataclass
class Slot:
    """One expert of the layout as the UI gives it: adapter name ("" = slot unused), where, box text
    `x0,y0,x1,y1` (fractions), mask file path, region prompt, scale."""

    adapter: str
    where: str = "whole image"
    box: str = ""
    mask: str | None = None
    prompt: str = ""
    scale: float = 1.0


@dataclass
class Layout:
    method: str
    slots: list[Slot] = field(default_factory=list)
    blend: str = "attention"  # regional: composition.BLENDS
    fit: float | None = None  # regional latent blend: fit_steps as a share of the request's steps (FIT_SHARE)

    def used(self) -> list[Slot]:
        return [s for s in self.slots if s.adapter]

    def backgrounds(self) -> list[str]:
        """The adapters set to "background" (compose's `background`; regions_of allows one, on regional)."""
        return [s.adapter for s in self.used() if s.where == BACKGROUND]

    @property
    def label(self) -> str:
        """The method as the tab's dropdown shows it (METHOD_LABELS)."""
        if self.method == "regional" and self.blend == "latent":
            return FITTED_LABEL if self.fit else LATENT_LABEL
        return self.method


# The tab's method dropdown: every method, and regional with the latent blend (plain and fitted) as choices of
# their own. The fitted blend's fit_steps: latent_blend.fit_steps_for (a share of the steps, recorded as `fit`).
LATENT_LABEL = "regional (latent blend)"
FITTED_LABEL = "regional (latent blend, fitted)"
METHOD_LABELS = tuple(m for name in METHODS
                      for m in ((name, LATENT_LABEL, FITTED_LABEL) if name == "regional" else (name,)))


def layout_for(label: str, slots: list[Slot]) -> Layout:
    """The Layout of a dropdown label (METHOD_LABELS; a bare method name too)."""
    if label == LATENT_LABEL:
        return Layout("regional", slots, "latent")
    if label == FITTED_LABEL:
        return Layout("regional", slots, "latent", FIT_SHARE)  # recorded, so a pasted text keeps the share
    return Layout(label, slots)


def fit_steps(layout: Layout, steps: int) -> int | None:
    """The fitted latent blend's fit_steps for a request of `steps`; None: no fitting."""
    return fit_steps_for(steps, layout.fit) if layout.fit else None  # the recorded share: paste-back reproduces


def _box(slot: Slot) -> tuple[float, ...]:
    if slot.where in PRESETS:
        return PRESETS[slot.where]
    try:
        return tuple(float(v) for v in slot.box.replace(" ", "").split(","))
    except ValueError:
        raise CompositionError(f"{slot.adapter}: a box is 4 numbers x0,y0,x1,y1 (fractions), got {slot.box!r}"
                               ) from None


def regions_of(layout: Layout) -> list[Region]:
    """The Region per expert for `regional` (masks read here); [] for the other methods, which check_layout refuses
    to give regions (a preset other than the whole image on those is a layout they cannot take)."""
    used = layout.used()
    automatic = [s.adapter for s in used if s.where == "automatic"]
    if automatic and (layout.method != "auto" or len(automatic) != len(used)):
        raise CompositionError("automatic regions come from method auto for every expert: choose method auto and "
                               "set each expert to automatic (or give boxes / masks with method regional)")
    background = layout.backgrounds()
    if background and layout.method not in LAYOUT_METHODS:
        raise CompositionError(f"{background[0]}: a background is for method regional (it draws wherever the "
                               "regions leave room); choose regional, or set the expert to the whole image")
    if len(background) > 1:
        raise CompositionError(f"two backgrounds ({background[0]}, {background[1]}); one expert draws the background")
    if layout.method not in LAYOUT_METHODS:
        placed = [s.adapter for s in used if s.where not in ("whole image", "automatic")]
        if placed:
            raise CompositionError(f"method {layout.method!r} takes no regions ({placed[0]} has one): choose method "
                                   "regional, or set every expert to the whole image")
        return []
    regions = []
    for slot in used:
        if slot.where == BACKGROUND:
            continue  # no region: layout_options names it the background
        prompt = slot.prompt.strip() or None
        if slot.where == "mask":
            if not slot.mask:
                raise CompositionError(f"{slot.adapter}: upload a mask (greyscale PNG, white = the region)")
            regions.append(Region(slot.adapter, mask=read_mask_picture(slot.mask), prompt=prompt))
        else:
            regions.append(Region(slot.adapter, box=_box(slot), prompt=prompt))
    return regions


def layout_options(layout: Layout, steps: int) -> dict:
    """compose()'s options: regional's blend (when not the default), background expert and fit_steps (for a request
    of `steps`); method auto: an automatic expert's region prompt is its trigger word (default: from its training
    prompt)."""
    if layout.method == "regional":
        options = {"blend": layout.blend} if layout.blend != "attention" else {}
        if layout.backgrounds():
            options["background"] = layout.backgrounds()[0]
        fit = fit_steps(layout, steps)
        if fit is not None:
            options["fit_steps"] = fit
        return options
    if layout.method != "auto":
        return {}
    triggers = {s.adapter: s.prompt.strip() for s in layout.used() if s.prompt.strip()}
    return {"triggers": triggers} if triggers else {}


class LayoutRunner:
    """The experts of the loaded adapters (read once per set of files), run on the app's pipeline."""

    def __init__(self, state):
        self.state = state
        self._experts: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def experts(self, layout: Layout) -> list:
        from ..mole import load_experts

        used = layout.used()
        if layout.method not in METHODS:
            raise CompositionError(f"unknown method {layout.method!r}; choose one of {', '.join(METHODS)}")
        loaded = self.state.loaded_adapters()
        missing = [s.adapter for s in used if s.adapter not in loaded]
        if missing:
            raise CompositionError(f"no adapter loaded named {missing[0]}; loaded: {', '.join(loaded) or 'none'}")
        names = [s.adapter for s in used]
        if len(set(names)) != len(names):
            raise CompositionError("an adapter is in two slots; give each expert one slot")
        key = tuple((n, str(loaded[n])) for n in names)
        with self._lock:
            if key not in self._experts:
                self._experts[key] = load_experts(self.state.pipe, [loaded[n] for n in names], names=names)
        return [replace(e, scale=float(s.scale)) for e, s in zip(self._experts[key], used, strict=True)]

    @contextmanager
    def base_weights(self):
        fusion = self.state.fusion
        with fusion.locked():
            previous = dict(fusion.scales)
            fusion.set_scales(dict.fromkeys(previous, 0.0))
            try:
                yield
            finally:
                fusion.set_scales(previous)

    def kept(self, layout: Layout) -> Layout:
        """The layout with each uploaded mask replaced by its copy under outputs/masks (what the PNG text names, so
        a pasted text reads the very same file)."""
        slots = [replace(s, mask=str(self.state.outputs / MASKS / keep_mask(self.state.outputs, s.mask)))
                 if s.where == "mask" and s.mask else s for s in layout.slots]
        return replace(layout, slots=slots)

    def check(self, layout: Layout, req: GenerationRequest) -> tuple[list, list[Region], dict]:
        """(experts, regions, compose() options) of the layout, everything compose() would refuse refused now."""
        experts = self.experts(layout)
        regions = regions_of(layout)
        options = layout_options(layout, req.steps)
        check_layout(layout.method, [e.name for e in experts], regions, (req.width, req.height), options,
                     steps=req.steps)
        if layout.method == "auto":
            from ..composition.auto import expert_triggers

            expert_triggers(experts, req.prompt, options.get("triggers"))
        return experts, regions, options

    def run(self, layout: Layout, req: GenerationRequest):
        """compose() of a validated request on the base weights (layout: `kept`): a CompositionResult and the
        regions it used."""
        from ..composition import compose

        experts, regions, options = self.check(layout, req)
        with self.base_weights():
            self.state.pipe.scheduler = make_scheduler(req.scheduler, self.state.scheduler_config)
            # the sum sliders are no part of a layout (its experts' scales are): compose() sees none
            result = compose(self.state.pipe, experts, layout.method, replace(req, scales={}), regions, **options)
        return result, regions


def keep_mask(outputs, path: str) -> str:
    """Copies an uploaded mask (read and checked as a mask) to outputs/masks/<sha>.png; returns that name."""
    picture = mask_picture(read_mask_picture(path))
    digest = hashlib.sha256(np.asarray(picture).tobytes() + str(picture.size).encode()).hexdigest()[:24]
    target = outputs / MASKS / f"{digest}.png"
    if not target.exists():
        save_image(picture, target)
    return target.name


def layout_json(layout: Layout, outputs) -> str:
    """The `Layout:` value of the PNG text (masks by their kept name)."""
    slots = [{"adapter": s.adapter, "where": s.where, "box": s.box if s.where == "box" else "",
              "mask": keep_mask(outputs, s.mask) if s.where == "mask" and s.mask else None,
              "prompt": s.prompt.strip(), "scale": float(s.scale)} for s in layout.used()]
    blend = {"blend": layout.blend} if layout.blend != "attention" else {}
    fit = {"fit": layout.fit} if layout.fit else {}
    return json.dumps({"method": layout.method, **blend, **fit, "slots": slots}, separators=(",", ":"))


def layout_from_text(text: str, outputs) -> Layout | None:
    """The layout a pasted parameters text records (None when it has none); masks from outputs/masks."""
    found = re.search(r'Layout: "((?:[^"\\]|\\.)*)"', text)
    if not found:
        return None
    try:
        data = json.loads(json.loads(f'"{found.group(1)}"'))
        slots = [Slot(**s) for s in data["slots"]]
        fit = None if data.get("fit") is None else float(data["fit"])
    except (ValueError, TypeError, KeyError):
        raise CompositionError("the Layout in this text is damaged; paste the whole text of a PNG made here") from None
    for slot in slots:
        if slot.mask is not None:
            path = outputs / MASKS / slot.mask
            if not re.fullmatch(r"[0-9a-f]{24}\.png", slot.mask) or not path.is_file():
                raise CompositionError(f"the mask of {slot.adapter} ({slot.mask}) is not in this app's outputs/masks")
            slot.mask = str(path)
    return Layout(data["method"], slots, str(data.get("blend", "attention")), fit)


def infotext_pairs(layout: Layout, regions: list[Region], outputs, steps: int) -> dict[str, str]:
    """Composition, Experts, Regions (readable) and Layout (exact, escaped for the quoted pair)."""
    pairs = {"Composition": layout.method,
             "Experts": " | ".join(f"{s.adapter}: {float(s.scale):g}" for s in layout.used())}
    if layout.blend != "attention":
        pairs["Blend"] = layout.blend
    options = layout_options(layout, steps)
    if options.get("background"):
        pairs["Background"] = options["background"]
    if options.get("fit_steps"):
        pairs["Fit steps"] = str(options["fit_steps"])
    if regions:
        pairs["Regions"] = " | ".join(r.describe().replace(",", " ") for r in regions)
    pairs["Layout"] = layout_json(layout, outputs).replace("\\", "\\\\").replace('"', '\\"')
    return pairs
