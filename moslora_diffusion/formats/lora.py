"""Exact fold of attached adapters into a standard LoRA, written in diffusers or kohya format.

B M A = (B M) A, so each layer becomes a rank-r LoRA with down = A and up = s * B M. Nothing of the
mixer is lost; the runtime scale s is baked into up.
- diffusers (`pytorch_lora_weights.safetensors`): diffusers assumes alpha == rank when no alpha is
  stored, so alpha / r is baked into up as well.
- kohya (`lora_unet_*`, `lora_te*_`): readers apply alpha / rank. One alpha for every layer of a file
  (`file_alpha`): the adapter's own when all layers share it, else the most common rank with each layer's
  alpha / file alpha baked into up (files that concatenate adapters: MoLE's static export, multi-adapter
  exports). Every loader then reads the same: diffusers 0.42 with transformers 5 renames text-encoder LoRA
  keys but not their `.alpha` keys, ignores those alphas and gives every text layer the file's most common
  alpha, which per-layer alphas would have made wrong for the layers of another rank.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..files.safetensors_io import save_tensors
from ..models.families import Family, detect_family
from ..moslora.folded import FoldedLoRA
from ..moslora.inject import AdapterError
from ..moslora.pipeline import pipeline_adapters
from .keymaps import to_ldm_unet_name, unet_block_prefixes

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPORT_RECORD = "moslora_export"  # metadata key of the record (title, adapters, target...) each LoRA file carries
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sdxl": "stable-diffusion-xl-v1-base/lora"}


def fold_pipeline(pipe) -> dict[str, dict[str, FoldedLoRA]]:
    """component -> module path -> FoldedLoRA, at each layer's current scale."""
    found = pipeline_adapters(pipe, canonical=True)
    if not found:
        raise AdapterError("the pipeline has no MoSLoRA adapters to export")
    folded = {}
    for component, layers in found.items():
        folded[component] = {}
        for module, layer in layers.items():
            down, up = layer.fold()
            folded[component][module] = FoldedLoRA(down, up, layer.alpha, tuple(layer.base_layer.weight.shape))
    return folded


def combine(folds: list[dict[str, dict[str, FoldedLoRA]]]) -> dict[str, dict[str, FoldedLoRA]]:
    """Several adapters as one LoRA, exactly: ranks are concatenated, alpha / rank baked into up."""
    merged: dict[str, dict[str, list[FoldedLoRA]]] = {}
    for fold in folds:
        for component, modules in fold.items():
            for module, lora in modules.items():
                merged.setdefault(component, {}).setdefault(module, []).append(lora)
    out: dict[str, dict[str, FoldedLoRA]] = {}
    for component, modules in merged.items():
        out[component] = {}
        for module, loras in modules.items():
            down = torch.cat([lora.down for lora in loras])
            up = torch.cat([lora.baked_up() for lora in loras], dim=1)
            out[component][module] = FoldedLoRA(down, up, float(down.shape[0]), loras[0].weight_shape)
    return out


def diffusers_state_dict(folded: dict[str, dict[str, FoldedLoRA]]) -> dict[str, torch.Tensor]:
    """Keys `<component>.<module>.lora_A.weight` / `.lora_B.weight`, as `load_lora_weights` reads them."""
    tensors = {}
    for component, modules in folded.items():
        for module, lora in modules.items():
            tensors[f"{component}.{module}.lora_A.weight"] = lora.as_weight_shape(lora.down)
            tensors[f"{component}.{module}.lora_B.weight"] = lora.as_weight_shape(lora.baked_up())
    return tensors


def kohya_module_name(component: str, module: str, family: Family, ldm_prefixes=None) -> str:
    """`lora_unet_down_blocks_0_..._to_q` (SD 1.x/2.x), `lora_unet_input_blocks_4_1_..._to_q` (SDXL).

    ldm_prefixes: `unet_block_prefixes(unet.config)`, needed for families with LDM-style UNet names.
    """
    if component == "unet":
        if family.kohya_unet_naming == "ldm":
            module = to_ldm_unet_name(module, ldm_prefixes)
        prefix = "lora_unet"
    else:
        prefix = family.kohya_text_prefixes[family.text_encoders.index(component)]
    return f"{prefix}_{module.replace('.', '_')}"


def file_alpha(folded: dict[str, dict[str, FoldedLoRA]]) -> float:
    """The one alpha a kohya file stores for every layer: the layers' common alpha, else their most common rank
    (the largest of equally common ones), so that most layers keep alpha == rank."""
    loras = [lora for modules in folded.values() for lora in modules.values()]
    alphas = {lora.alpha for lora in loras}
    if len(alphas) == 1:
        return alphas.pop()
    ranks = Counter(lora.rank for lora in loras)
    return float(max(ranks, key=lambda rank: (ranks[rank], rank)))


def kohya_state_dict(folded: dict[str, dict[str, FoldedLoRA]], family: Family,
                     unet_config=None) -> dict[str, torch.Tensor]:
    """`<name>.lora_down.weight`, `.lora_up.weight` and `.alpha`: the same alpha (a scalar) for every layer,
    `file_alpha(folded)`; a layer with another alpha has alpha / file alpha baked into its up (the same delta)."""
    prefixes = unet_block_prefixes(unet_config) if family.kohya_unet_naming == "ldm" else None
    alpha = file_alpha(folded)
    tensors = {}
    for component, modules in folded.items():
        for module, lora in modules.items():
            name = kohya_module_name(component, module, family, prefixes)
            up = lora.up if lora.alpha == alpha else lora.up * (lora.alpha / alpha)
            tensors[f"{name}.lora_down.weight"] = lora.as_weight_shape(lora.down)
            tensors[f"{name}.lora_up.weight"] = lora.as_weight_shape(up)
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in tensors.items()}


def save_diffusers_lora(folded, folder: str | Path, info: dict | None = None,
                        dtype: torch.dtype = torch.float32, overwrite: bool = True) -> Path:
    """Writes `<folder>/pytorch_lora_weights.safetensors`, which `pipe.load_lora_weights(folder)` reads."""
    tensors = _cast(diffusers_state_dict(folded), dtype)
    return save_tensors(tensors, Path(folder) / DIFFUSERS_WEIGHT_NAME, {EXPORT_RECORD: json.dumps(info or {})},
                        overwrite=overwrite)


def save_kohya_lora(folded, path: str | Path, family: Family, unet_config, info: dict | None = None,
                    dtype: torch.dtype = torch.float32, overwrite: bool = True) -> Path:
    """A kohya-format LoRA file for A1111 / ComfyUI, with the metadata their UIs show."""
    tensors = kohya_state_dict(folded, family, unet_config)
    tensors = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in tensors.items()}
    ranks = {lora.rank for modules in folded.values() for lora in modules.values()}
    info = info or {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(file_alpha(folded)),
        "ss_base_model_version": KOHYA_BASE_VERSION[family.name],
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC_ARCH[family.name],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": str(info.get("title", Path(path).stem)),
        EXPORT_RECORD: json.dumps(info),
    }
    return save_tensors(tensors, path, metadata, overwrite=overwrite)


def export_pipeline_loras(pipe, diffusers_folder: str | Path | None = None, kohya_path: str | Path | None = None,
                          info: dict | None = None) -> dict[str, Path]:
    """Folds the pipeline's adapters once and writes whichever formats were asked for."""
    folded = fold_pipeline(pipe)
    family = detect_family(pipe)
    written = {}
    if diffusers_folder is not None:
        written["diffusers"] = save_diffusers_lora(folded, diffusers_folder, info)
    if kohya_path is not None:
        written["kohya"] = save_kohya_lora(folded, kohya_path, family, dict(pipe.unet.config), info)
    return written
