"""The layout's requests: generate (alone or compared with base | sum | MoLE, one seed), export for ComfyUI / A1111,
paste a PNG's parameters back. Everything is checked before any image runs; refusals are one line."""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from ..composition import CompositionError
from ..composition.export import check_export, export_workflow, file_stem, refuse_unexpressible
from ..composition.report import save_mask_pictures
from ..files.atomic import atomic_write
from ..generation.text_to_image import (
    GeneratedImage,
    GenerationRequest,
    MoLESettings,
    format_infotext,
    generate,
    parse_infotext,
    validate_request,
)
from .compose import compose_images, request_from_infotext
from .layout import Layout, infotext_pairs, layout_from_text

COLOURS = ((230, 60, 60), (60, 120, 230), (60, 190, 90), (230, 170, 40), (170, 70, 200), (40, 190, 200),
           (200, 110, 60), (120, 120, 120))


@dataclass
class LayoutImages:
    """What a layout request saved: the images (app Saved records) and, per expert, the mask over the image."""

    saved: list
    overlays: list[tuple[Image.Image, str]]


def overlay(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The image with the expert's share map (H, W) in [0, 1] painted over it in `colour` (60% where it is 1)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = 0.6 * np.clip(mask, 0, 1)[..., None]
    return Image.fromarray(np.rint(base * (1 - weight) + np.array(colour, np.float32) * weight).astype(np.uint8))


def _compared(state, req: GenerationRequest, mole: MoLESettings | None) -> list[GeneratedImage]:
    """base | sum | MoLE of the request's seed (MoLE only when a MoLE file is chosen)."""
    if mole is not None and mole.file:
        return compose_images(state, replace(req, mole=mole), "compare")
    summed = generate(state.pipe, state.fusion, replace(req, compare_with_base=True), state.model_name,
                      state.scheduler_config)
    return [replace(i, label="sum") if i.label == "adapted" else i for i in summed]


def generate_layout(state, req: GenerationRequest, layout: Layout, compare: bool = False,
                    mole: MoLESettings | None = None) -> LayoutImages:
    """The layout's image (num_images 1), saved with its parameters text and its mask pictures; with `compare`,
    base, sum and MoLE of the same seed first. Raises CompositionError / GenerationError before any image runs."""
    start = time.perf_counter()
    req = validate_request(replace(req, num_images=1), state.fusion.names())
    layout = state.layout.kept(layout)
    state.layout.check(layout, req)  # experts read, regions checked, before any image runs
    items = []
    if compare:
        if mole is not None and mole.file:
            state.compose.check(mole)
        items += _compared(state, req, mole)
    result, regions = state.layout.run(layout, req)
    text = format_infotext(req, req.seed, {}, state.model_name, infotext_pairs(layout, regions, state.outputs,
                                                                                 req.steps))
    items.append(GeneratedImage(result.images[0], text, layout.method, req.seed))
    saved = state.save_generated(items, start)
    overlays = []
    if result.masks is not None:
        save_mask_pictures(result.masks[0], saved[-1].path.with_suffix(""))
        for i, (name, mask) in enumerate(result.masks[0].items()):
            overlays.append((overlay(result.images[0], mask, COLOURS[i % len(COLOURS)]), f"{name} ({layout.method})"))
    return LayoutImages(saved, overlays)


def export_layout(state, req: GenerationRequest, layout: Layout) -> Path:
    """The layout as a ComfyUI / A1111 export (composition/export.py) under outputs/exports/, zipped for download;
    returns the zip. CompositionError for a layout a workflow cannot express (before anything is written)."""
    req = validate_request(replace(req, num_images=1), state.fusion.names())
    refuse_unexpressible(layout.method)  # first: its line says what to do instead
    if layout.method == "regional" and layout.blend == "latent":  # a workflow blends by masked conditioning
        raise CompositionError("the latent blend has no ComfyUI workflow (the workflow applies each LoRA through its "
                               "masked conditioning, as method regional does): choose regional to export")
    if layout.backgrounds():  # a workflow's masks are fixed pictures
        raise CompositionError("a background is not exported to a workflow: give that expert a mask (white where no "
                               "other region is) instead, then export")
    layout = state.layout.kept(layout)
    experts, regions, _ = state.layout.check(layout, req)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = file_stem("+".join(s.adapter for s in layout.used()))[:60]
    folder = state.outputs / "exports" / f"{stamp}-{name}-comfyui"
    check_export([e.name for e in experts], req, regions, layout.method)
    checkpoint = state.model_name if state.model_name.endswith(".safetensors") else f"{state.model_name}.safetensors"
    export_workflow(state.pipe, experts, req, regions, folder, Path(checkpoint).name)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(folder.name) / path.relative_to(folder))

    return atomic_write(folder.with_suffix(".zip"), write)


def paste_layout(state, text: str) -> tuple[GenerationRequest, str, Layout | None]:
    """(request, mode, layout) of a pasted parameters text: a layout image gives its layout (mode "layout"), any
    other the Compose modes' request_from_infotext."""
    layout = layout_from_text(text or "", state.outputs)
    if layout is None:
        req, mode = request_from_infotext(state, text)
        return req, mode, None
    return parse_infotext(text), "layout", layout
