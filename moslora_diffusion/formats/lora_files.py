"""Reading LoRA files users already have as FoldedAdapters: diffusers, kohya, and our native MoSLoRA file.

Safetensors only (files/safetensors_io.py refuses pickles). Formats, told apart by their keys:
- native `moslora.safetensors`: `<component>.<module>.moslora_{A,M,B}` (or the authors' `lora_AB`), folded
  exactly with up = B M (moslora/folded.py);
- diffusers (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` / `.lora_B.weight`
  (`text_encoder.`, `text_encoder_2.`); scale alpha / r from a `.alpha` key or diffusers' `lora_adapter_metadata`
  (PEFT's lora_alpha / r), else 1 (what diffusers assumes);
- kohya (A1111 / ComfyUI): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_` (SD 1.x/2.x), `lora_te1_` / `lora_te2_` (SDXL). The `_`-joined names are mapped back by computing,
  for every adaptable module of the pipeline, the name our writer gives it (`lora.kohya_module_name`, both the
  diffusers-style and the LDM-style UNet naming) and inverting that table: no hand-written name list.
Keys of other adapter kinds (LyCORIS LoHa/LoKr, DoRA, 3x3 conv LoRA) are refused, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..files.safetensors_io import load_tensors, read_keys, read_metadata
from ..models.families import Family, detect_family
from ..moslora.folded import FoldedAdapter, FoldedLoRA, check_finite, fold_adapter_file
from ..moslora.inject import AdapterError
from ..moslora.layer import is_adaptable
from ..moslora.native_file import read_adapter
from ..moslora.pipeline import canonical_module_name, model_components
from .keymaps import unet_block_prefixes
from .lora import kohya_module_name

FORMATS = ("moslora", "diffusers", "kohya")
_NATIVE_SUFFIXES = (".moslora_A", ".moslora_M", ".moslora_B", ".lora_AB.weight")
_DIFFUSERS_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                    ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_NOT_PLAIN = "not a plain LoRA key (LyCORIS LoHa/LoKr, DoRA and other adapter kinds are not supported)"


def file_format(keys: set[str], label: str) -> str:
    """"moslora", "diffusers" or "kohya" from a file's tensor names; AdapterError for anything else."""
    if any(k.endswith(_NATIVE_SUFFIXES) for k in keys):
        return "moslora"
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.split(".")[0] in _COMPONENTS and k.endswith(tuple(_DIFFUSERS_PARTS)) for k in keys):
        return "diffusers"
    example = sorted(keys)[0] if keys else "none"
    raise AdapterError(f"{label}: not a LoRA file this tool reads (keys like {example!r}); expected a native "
                       "moslora.safetensors, a diffusers or a kohya LoRA")


def family_hint(keys: set[str], metadata: dict[str, str]) -> str | None:
    """The base family ("sd1", "sd2", "sdxl") a file records or its keys imply; None when it does not say."""
    for field in ("moslora", "moslora_export"):
        try:
            family = json.loads(metadata.get(field, "{}")).get("family")
        except (json.JSONDecodeError, AttributeError):
            family = None
        if family:
            return family
    version = metadata.get("ss_base_model_version", "")  # kohya: sd_v1, sd_v2(_768_v), sdxl_base_v1-0
    for prefix, name in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return name
    architecture = metadata.get("modelspec.architecture", "")
    for stem, name in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if architecture.startswith(stem):
            return name
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    return None


def trigger_prompt(metadata: dict[str, str], key: str = "instance_prompt") -> str | None:
    """The instance prompt our own files record (native metadata or an export's `moslora_export`); key
    "class_prompt": the class prompt of its prior preservation, when recorded."""
    for field in ("moslora", "moslora_export"):
        try:
            record = json.loads(metadata.get(field, "{}"))
            adapters = record.get("adapters") or []
            # an export of one adapter records its prompts per adapter; a merge of several has no one prompt
            prompt = record.get(key) or (adapters[0].get(key) if len(adapters) == 1 else None)
        except (json.JSONDecodeError, AttributeError, TypeError):
            prompt = None
        if prompt:
            return str(prompt)
    return None


def trigger_word(metadata: dict[str, str]) -> str | None:
    """The pivotal-tuning word a folded LoRA of ours was trained with (a training run's exports record it, an export
    command's record names it per adapter): the LoRA alone lacks the word's learned vectors (<word>.safetensors)."""
    try:
        record = json.loads(metadata.get("moslora_export", "{}"))
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    entries = [e for e in record.get("adapters") or [] if isinstance(e, dict)]
    words = [w for w in [record.get("token_abstraction"), *(e.get("token_abstraction") for e in entries)] if w]
    return str(words[0]) if words else None


def _matrix(tensor: torch.Tensor, label: str, key: str) -> torch.Tensor:
    """(r, in) / (out, r) in fp32; a 1x1-conv factor (r, in, 1, 1) loses its unit dims."""
    if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
        tensor = tensor[:, :, 0, 0]
    if tensor.dim() != 2:
        raise AdapterError(f"{label}: {key} has shape {tuple(tensor.shape)}; only Linear and 1x1-conv LoRAs are "
                           "supported (not 3x3 conv LoRA / LoCon)")
    return tensor.float().contiguous()


def _group(tensors: dict[str, torch.Tensor], parts: dict[str, str], label: str) -> dict[str, dict[str, torch.Tensor]]:
    """stem -> {"down", "up", ["alpha"]} by each key's suffix; an unknown suffix is refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in parts if key.endswith(s)), None)
        if suffix is None:
            raise AdapterError(f"{label}: {key!r} is {_NOT_PLAIN}")
        grouped.setdefault(key[: -len(suffix)], {})[parts[suffix]] = tensor
    for stem, found in grouped.items():
        if "down" not in found or "up" not in found:
            raise AdapterError(f"{label}: {stem} lacks its {'down' if 'down' not in found else 'up'} weight "
                               "(incomplete LoRA file)")
    return grouped


def _lora(found: dict[str, torch.Tensor], scale_of_rank, label: str, stem: str) -> FoldedLoRA:
    down, up = _matrix(found["down"], label, stem), _matrix(found["up"], label, stem)
    if up.shape[1] != down.shape[0]:
        raise AdapterError(f"{label}: {stem} has down rank {down.shape[0]} but up rank {up.shape[1]}")
    rank = down.shape[0]
    alpha = float(found["alpha"]) if "alpha" in found else scale_of_rank(rank) * rank
    return FoldedLoRA(down, up, alpha, (up.shape[0], down.shape[1]))


def _peft_scale(metadata: dict[str, str], component: str, module: str, label: str):
    """rank -> alpha / rank from diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per component)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        config = {}
    if config.get(f"{component}.use_dora"):
        raise AdapterError(f"{label}: a DoRA LoRA for the {component}, {_NOT_PLAIN}")
    alpha = config.get(f"{component}.lora_alpha")
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    rslora = bool(config.get(f"{component}.use_rslora"))
    if alpha is None:
        return lambda rank: 1.0  # diffusers' convention: no alpha stored means alpha == rank
    return lambda rank: float(alpha) / (math.sqrt(rank) if rslora else rank)


def read_diffusers(tensors, metadata, label: str) -> dict:
    layers = {}
    for stem, found in _group(tensors, _DIFFUSERS_PARTS, label).items():
        component, _, module = stem.partition(".")
        if component not in _COMPONENTS or not module:
            raise AdapterError(f"{label}: {stem!r} names no pipeline component (expected unet., text_encoder., "
                               "text_encoder_2.)")
        if component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module  # a flat-CLIP name; files keep the classic one
        scale = _peft_scale(metadata, component, module, label)
        layers[(component, module)] = _lora(found, scale, label, stem)
    return layers


def kohya_names(pipe, family: Family) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, canonical module path), for every adaptable module of the pipeline.

    Computed with the writer's own naming (both UNet namings: diffusers-style and LDM-style), then inverted.
    """
    components = model_components(pipe, family)
    prefixes = unet_block_prefixes(dict(pipe.unet.config))
    namings = [family] + [dataclasses.replace(family, kohya_unet_naming=n) for n in ("diffusers", "ldm")
                          if n != family.kohya_unet_naming]
    table: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if not (name and is_adaptable(module)):
                continue
            canonical = canonical_module_name(model, name)
            for naming in namings if component == "unet" else namings[:1]:
                try:
                    table.setdefault(kohya_module_name(component, canonical, naming, prefixes), (component, canonical))
                except KeyError:  # a module with no place in the LDM layout has only its diffusers-style name
                    continue
    return table


def read_kohya(tensors, pipe, family: Family, label: str) -> dict:
    table = kohya_names(pipe, family)
    layers = {}
    for stem, found in _group(tensors, _KOHYA_PARTS, label).items():
        if stem not in table:
            raise AdapterError(f"{label}: {stem} matches no adaptable module of this {family.label} pipeline "
                               "(a LoRA for another base model?)")
        layers[table[stem]] = _lora(found, lambda rank: 1.0, label, stem)
    return layers


def read_lora_file(path: str | Path, pipe, name: str) -> tuple[FoldedAdapter, str]:
    """(the file folded to plain LoRA factors, its format). Modules and shapes are checked by the caller
    (`moslora.folded.validate_folded`); this refuses unknown keys and non-finite weights. Raises AdapterError,
    or WeightFileError for a missing, pickle or damaged file."""
    path = Path(path)
    label = str(path)
    keys = read_keys(path)
    kind = file_format(keys, label)
    metadata = read_metadata(path)
    if kind == "moslora":
        adapter = read_adapter(path)
        return fold_adapter_file(adapter, name, path), kind
    hint = family_hint(keys, metadata)
    info = {"family": hint, "instance_prompt": trigger_prompt(metadata),
            "class_prompt": trigger_prompt(metadata, "class_prompt"), "token_abstraction": trigger_word(metadata)}
    tensors, _ = load_tensors(path)
    if kind == "diffusers":
        layers = read_diffusers(tensors, metadata, label)
    else:
        family = detect_family(pipe)
        if hint and hint != family.name:  # the name table of another family would only report a key mismatch
            raise AdapterError(f"{label}: a LoRA for {hint}, but the model is {family.name} ({family.label})")
        layers = read_kohya(tensors, pipe, family, label)
    folded = FoldedAdapter(name, path, layers, {k: v for k, v in info.items() if v})
    check_finite(folded)
    return folded, kind
