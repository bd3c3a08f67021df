"""Export a regional composition for ComfyUI and A1111: one folder, written atomically.

    <out>/loras/<expert>.safetensors      each expert as a kohya LoRA (alpha = rank: its delta exactly, scale 1)
    <out>/masks/<out>-<expert>.png        its share map w_i (greyscale, white = the expert acts fully)
    <out>/masks/<out>-background.png      1 - sum_i w_i, where the base model acts (left out when it is 0)
    <out>/workflow_api.json               the ComfyUI API-format graph (workflow.py)
    <out>/a1111-regional-prompter.txt     Regional Prompter's latent-mode settings and prompt (a1111.py)
    <out>/composition.json                what was exported (request, regions, experts)
    <out>/README.txt                      what to put where

Only the `regional` method with user regions is expressible: `refuse_unexpressible` says, in one line before any
model loads, what to do for the others. Trigger-word embeddings: MoLE experts (mole/experts.py) refuse pivotal-tuned
adapters, so a composition's experts carry none and no embedding file is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..files.atomic import foreign_files_message, write_folder_atomically
from ..formats.export_targets import DTYPES
from ..formats.lora import save_kohya_lora
from ..generation.text_to_image import GenerationRequest
from ..models.families import detect_model
from ..mole import Expert
from .a1111 import regional_prompter_text
from .api import check_layout
from .regions import CompositionError, Region, expert_masks, share_weights
from .report import mask_picture
from .workflow import WorkflowRegion, WorkflowSettings, comfyui_workflow

WORKFLOW_TARGET = "comfyui-workflow"
INSTEAD = {
    "auto": "automatic regions are found while generating (trigger-word cross-attention), which no workflow node "
            "computes: generate once with --method auto, then export with --method regional and its "
            "<image>-mask-<expert>.png files as --region_mask",
    "spatial_mole": "spatial MoLE gates are computed per position by learned gates, which ComfyUI has no node for: "
                    "give each expert a box or mask with --method regional, or fold the gates with --to lora-kohya",
    "mole": "MoLE's per-block gates have no ComfyUI node: fold them into one LoRA with --to lora-kohya, or give each "
            "expert a box or mask with --method regional",
}


def refuse_unexpressible(method: str) -> None:
    """CompositionError (one line) for a method a ComfyUI workflow cannot express, saying what to do instead."""
    if method == "regional":
        return
    instead = INSTEAD.get(method, "a whole-image method takes no regions: give each expert a box or mask with "
                                  "--method regional, or fold the experts into one LoRA with "
                                  "`python -m moslora_diffusion.export --to lora-kohya`")
    raise CompositionError(f"--to {WORKFLOW_TARGET} cannot express method {method!r}: {instead}")


def file_stem(name: str) -> str:
    """A file-name-safe stem of an expert or folder name (letters, digits, . _ -)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "expert"


def share_maps(regions: Sequence[Region], names: Sequence[str], width: int, height: int) -> np.ndarray:
    """(N, H, W) float32 shares w_i at image size (regions.py's overlap rule), the maps the workflow's masks hold."""
    masks = expert_masks(regions, names, width, height)
    return share_weights(torch.from_numpy(masks)[None])[0].numpy()


def _record(req: GenerationRequest, regions: Sequence[Region], experts: Sequence[Expert], checkpoint: str) -> dict:
    return {"method": "regional", "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
            "steps": req.steps, "guidance": req.guidance, "width": req.width, "height": req.height,
            "sampler": req.scheduler, "checkpoint": checkpoint, "regions": [r.describe() for r in regions],
            "experts": [e.describe() for e in experts], "moslora_diffusion": __version__}


def readme_text(out_name: str, checkpoint: str, loras: Sequence[str], masks: Sequence[str]) -> str:
    """What to set up in ComfyUI and A1111 (README.txt of the export)."""
    return (f"Composition {out_name}, exported by moslora-diffusion {__version__}.\n\n"
            "ComfyUI (core nodes only; hook nodes are in ComfyUI since late 2024):\n"
            f"  1. Put the base checkpoint in ComfyUI/models/checkpoints/ as {checkpoint}\n"
            "     (a diffusers base: `python -m moslora_diffusion.export --to merged-single-file` with no adapter\n"
            "     writes it, or pick your copy of the same base in the loader node).\n"
            f"  2. Copy loras/*.safetensors ({', '.join(loras)}) to ComfyUI/models/loras/.\n"
            f"  3. Copy masks/*.png ({', '.join(masks)}) to ComfyUI/input/.\n"
            "  4. Load workflow_api.json (drag it into ComfyUI, or POST it as {\"prompt\": ...} to /prompt), Queue.\n"
            "  Each expert's LoRA acts through a hook on its own masked conditioning; the rest of the image is the\n"
            "  base model with the global prompt. ComfyUI blends whole-model predictions by the masks where\n"
            "  moslora-diffusion blends each adapted layer, so the images are close, not identical.\n\n"
            "A1111: see a1111-regional-prompter.txt (the Regional Prompter extension in latent mode; Forge does not\n"
            "support latent mode). Copy loras/*.safetensors to stable-diffusion-webui/models/Lora/.\n")


def _write_all(folder: Path, name: str, pipe, experts: Sequence[Expert], req: GenerationRequest,
               regions: Sequence[Region], checkpoint: str, dtype: str) -> None:
    names = [e.name for e in experts]
    shares = share_maps(regions, names, req.width, req.height)
    stem = file_stem(name)
    (folder / "loras").mkdir()
    (folder / "masks").mkdir()
    family, unet_config = detect_model(pipe).family, dict(pipe.unet.config)
    by_name = {e.name: e for e in experts}
    wf_regions, loras = [], {}
    for region in regions:
        expert, lora = by_name[region.expert], file_stem(region.expert)
        save_kohya_lora(expert.folded.by_component(), folder / "loras" / f"{lora}.safetensors", family, unet_config,
                        {"title": lora, "expert": expert.describe()}, DTYPES[dtype])
        mask = f"{stem}-{lora}.png"
        mask_picture(shares[names.index(region.expert)]).save(folder / "masks" / mask)
        wf_regions.append(WorkflowRegion(region.expert, f"{lora}.safetensors", mask, region.prompt or req.prompt,
                                         float(expert.scale)))
        loras[region.expert] = (lora, float(expert.scale))
    background = np.clip(1.0 - shares.sum(axis=0), 0.0, 1.0)
    background_name = f"{stem}-background.png" if np.rint(background * 255).max() > 0 else None
    if background_name:
        mask_picture(background).save(folder / "masks" / background_name)
    settings = WorkflowSettings(checkpoint, req.prompt, req.negative_prompt, req.seed, req.steps, req.guidance,
                                req.scheduler, req.width, req.height, background_name, f"moslora-{stem}")
    workflow = comfyui_workflow(settings, wf_regions)
    (folder / "workflow_api.json").write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
    (folder / "a1111-regional-prompter.txt").write_text(regional_prompter_text(
        regions, loras, req.prompt, req.negative_prompt, req.width, req.height), encoding="utf-8")
    (folder / "composition.json").write_text(json.dumps(_record(req, regions, experts, checkpoint), indent=1) + "\n",
                                             encoding="utf-8")
    (folder / "README.txt").write_text(readme_text(stem, checkpoint, [f"{lo}.safetensors" for lo, _ in loras.values()],
                                                   sorted(p.name for p in (folder / "masks").iterdir())),
                                       encoding="utf-8")


def check_export(experts: Sequence[str], req: GenerationRequest, regions: Sequence[Region], method: str = "regional",
                 dtype: str = "fp16") -> None:
    """Everything checkable before a model loads: the method, the regions (check_layout), the dtype."""
    refuse_unexpressible(method)
    check_layout("regional", experts, regions, (req.width, req.height))
    if dtype not in DTYPES:
        raise CompositionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


# What marks a folder as a workflow export of ours (--overwrite replaces only such a folder).
WORKFLOW_FILES = ("composition.json", "workflow_api.json")


def check_workflow_out(out: str | Path, overwrite: bool) -> Path:
    """The export folder, checked before anything loads: not a file; an existing non-empty folder only with
    `overwrite`, and only when it is an earlier workflow export (WORKFLOW_FILES): --overwrite replaces the folder
    whole, and a base model, a photo folder or any other folder must never go with it. Raises CompositionError or
    FileExistsError, one line each."""
    out = Path(out).expanduser()
    if out.is_file():
        raise CompositionError(f"--out {out} is a file; the export writes a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        if not all((out / name).is_file() for name in WORKFLOW_FILES):
            raise CompositionError(f"--out {out} holds files that are not a workflow export of ours; --overwrite "
                                   "replaces only an earlier export: choose a new folder")
        foreign = _not_written_by_the_export(out)
        if foreign:
            raise CompositionError(foreign_files_message(out, foreign))
    return out


# What _write_all writes: these names at the top, kohya LoRAs under loras/, mask pictures under masks/.
_EXPORT_TOP = {*WORKFLOW_FILES, "a1111-regional-prompter.txt", "README.txt", "loras", "masks"}
_EXPORT_SUFFIX = {"loras": ".safetensors", "masks": ".png"}


def _not_written_by_the_export(out: Path) -> list[str]:
    """Relative paths under an earlier export that no export writes (the user's notes, renders), sorted."""
    foreign = []
    for path in sorted(out.rglob("*")):
        parts = path.relative_to(out).parts
        ours = parts[0] in _EXPORT_TOP and (len(parts) == 1 or (
            len(parts) == 2 and parts[0] in _EXPORT_SUFFIX and path.suffix == _EXPORT_SUFFIX[parts[0]]))
        if not ours:
            foreign.append("/".join(parts))
    return foreign


def export_workflow(pipe, experts: Sequence[Expert], req: GenerationRequest, regions: Sequence[Region],
                    out: str | Path, checkpoint: str, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Writes the folder described in the module docstring for a validated request (a concrete seed) and returns
    it. `experts`: mole.load_experts on `pipe`'s base; only experts with a region are exported. Raises
    CompositionError / FileExistsError before writing; a failure while writing leaves no partial folder."""
    check_export([e.name for e in experts], req, regions, dtype=dtype)
    if req.seed < 0:
        raise CompositionError("the workflow needs a concrete seed (0 or more), not -1")
    out = check_workflow_out(out, overwrite)
    needed = sum(t.numel() * 2 for e in experts for lo in e.layers.values() for t in (lo.down, lo.up))

    def write(tmp: Path) -> None:
        _write_all(tmp, out.name, pipe, experts, req, regions, checkpoint, dtype)

    return write_folder_atomically(out, write, needed, overwrite)
