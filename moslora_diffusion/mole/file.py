"""The MoLE file, `mole.safetensors`: the gates and every expert's folded weights, self-contained.

Tensors (fp32):
- `gate.<block>.weight` (N, C + D), `gate.<block>.bias` (N,), `gate.<block>.log_temperature` (), block names as
  `MoLE.gate_state()` gives them (`unet.down_blocks.1.attentions.0`, `text_encoder.text_model.encoder.layers.0`);
- `expert.<i>.<component>.<module>.down` (r, in) and `.up` (out, r), alpha / r baked into up (delta = up @ down).
Metadata `mole` (JSON): format_version, family, base_model, experts (name, source file name, format, sha256,
family, trigger_prompt, rank, layers, scale), blocks, settings (balance weight, gate features, ...).
Written atomically (files/); read without pickles; loading checks the family, every shape, and, when experts
are given, that the gates were trained for exactly those experts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files.safetensors_io import load_tensors, save_tensors
from ..models.families import detect_family
from ..moslora.folded import FoldedAdapter, FoldedLoRA
from .experts import Expert, MoLEError, as_mole_error, check_count
from .model import MoLE, attach_mole

FILE_NAME = "mole.safetensors"
FORMAT_VERSION = 1
METADATA_KEY = "mole"
GATE_FEATURES = ("unet block: LayerNorm(mean over H, W of the block input) ++ LayerNorm(max over tokens of the "
                 "prompt embedding); text layer: LayerNorm(mean over unmasked tokens of its input, max over tokens "
                 "without a mask); no affine")


@dataclass
class MoLEFile:
    experts: list[Expert]
    gates: dict[str, torch.Tensor]  # MoLE.gate_state() form
    info: dict  # the metadata record


def save_mole(mole: MoLE, path: str | Path, base_model: str | None = None, settings: Mapping | None = None) -> Path:
    """Writes `mole` (gates + experts + metadata) to `path` atomically and returns it."""
    tensors = {f"gate.{key}": value for key, value in mole.gate_state().items()}
    for i, expert in enumerate(mole.experts):
        for (component, module), lora in expert.layers.items():
            tensors[f"expert.{i}.{component}.{module}.down"] = lora.down.detach().float()
            tensors[f"expert.{i}.{component}.{module}.up"] = lora.up.detach().float()
    record = {"format_version": FORMAT_VERSION, "family": mole.family, "base_model": base_model,
              "experts": [dict(e.describe(), scale=float(s)) for e, s in zip(mole.experts, mole.scales, strict=True)],
              "blocks": [b.name for b in mole.blocks], "ungated_layers": mole.has_ungated_layers,
              "settings": {"granularity": mole.granularity, "gate_features": GATE_FEATURES, **dict(settings or {})}}
    return save_tensors(tensors, path, {METADATA_KEY: json.dumps(record), "format": "pt"})


def _expert_layers(tensors: dict[str, torch.Tensor], count: int, label: str) -> list[dict]:
    layers: list[dict] = [{} for _ in range(count)]
    for key, tensor in tensors.items():
        if not key.startswith("expert."):
            continue
        index, _, rest = key[len("expert."):].partition(".")
        component, _, module_part = rest.partition(".")
        module, _, part = module_part.rpartition(".")
        if not index.isdigit() or int(index) >= count or part not in ("down", "up") or not module:
            raise MoLEError(f"{label}: unexpected tensor {key!r} (a damaged MoLE file?)")
        layers[int(index)].setdefault((component, module), {})[part] = tensor.float()
    return layers


def _experts_from(tensors: dict[str, torch.Tensor], record: dict, path: Path) -> list[Expert]:
    described = record.get("experts") or []
    check_count(len(described))
    experts = []
    for entry, layers in zip(described, _expert_layers(tensors, len(described), str(path)), strict=True):
        folded_layers = {}
        for key, parts in layers.items():
            if set(parts) != {"down", "up"}:
                raise MoLEError(f"{path}: expert {entry.get('name')} lacks down or up at {key[0]}.{key[1]}")
            down, up = parts["down"], parts["up"]
            folded_layers[key] = FoldedLoRA(down, up, float(down.shape[0]), (up.shape[0], down.shape[1]))
        if not folded_layers:
            raise MoLEError(f"{path}: expert {entry.get('name')} has no weights")
        folded = FoldedAdapter(str(entry["name"]), path, folded_layers, {"family": entry.get("family")})
        experts.append(Expert(folded, str(entry.get("source", entry["name"])), "mole", str(entry.get("sha256", "")),
                              entry.get("family") or record.get("family"), entry.get("trigger_prompt"), None,
                              float(entry.get("scale", 1.0)), entry.get("class_prompt")))
    return experts


def read_mole(path: str | Path) -> MoLEFile:
    """The gates, experts and metadata of a MoLE file (nothing is attached). Raises MoLEError."""
    path = Path(path)
    with as_mole_error():
        tensors, metadata = load_tensors(path)
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise MoLEError(f"{path} is not a MoLE file (no '{METADATA_KEY}' metadata)") from None
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise MoLEError(f"{path}: MoLE file format {record['format_version']} is newer than this version reads "
                        f"({FORMAT_VERSION}); update moslora-diffusion")
    gates = {key[len("gate."):]: value for key, value in tensors.items() if key.startswith("gate.")}
    return MoLEFile(_experts_from(tensors, record, path), gates, record)


def check_same_experts(stored: Sequence[Expert], given: Sequence[Expert], label: str) -> None:
    """The gates of a MoLE file fit only the experts they were trained with: same count, names and file hashes."""
    def describe(experts):
        return ", ".join(f"{e.name} ({e.sha256[:12]})" for e in experts)

    same = len(stored) == len(given) and all(a.name == b.name and a.sha256 == b.sha256
                                             for a, b in zip(stored, given, strict=False))
    if not same:
        raise MoLEError(f"{label}: its gates were trained for experts {describe(stored)}, not {describe(given)}")


def load_mole(pipe, path: str | Path, experts: Sequence[Expert] | None = None) -> MoLE:
    """Reads a MoLE file and attaches it to `pipe` with its own experts and learned gates.

    experts: when given (e.g. from `load_experts`), the file's gates must have been trained for exactly these
    (count, names, sha256 of the source files), else MoLEError. The family, every expert layer and every gate
    shape are checked against the pipeline before anything is attached."""
    mole_file = read_mole(path)
    family = detect_family(pipe)
    stored = mole_file.info.get("family")
    if stored and stored != family.name:
        raise MoLEError(f"{path}: MoLE trained for {stored}, but the pipeline is {family.name} ({family.label})")
    if experts is not None:
        check_same_experts(mole_file.experts, experts, str(path))
    return attach_mole(pipe, mole_file.experts, gates=mole_file.gates, granularity=granularity(mole_file))


def granularity(mole_file: MoLEFile) -> str:
    """"block" (the paper's gates) or "position" (spatial gates) as the file records it."""
    return (mole_file.info.get("settings") or {}).get("granularity", "block")
