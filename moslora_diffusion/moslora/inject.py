"""Attach MoSLoRA layers to a UNet or CLIP text encoder, find them again, and take them off.

We adapt the projection *layers* rather than attention processors, so every diffusers attention
backend (SDPA, xformers, custom processors) keeps working, and text encoders (no processors) too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import step_weights
from .layer import KINDS, MIXER_INITS, MoSLoRALinear, check_adapter_numbers, is_adaptable

_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_PROJ = ("proj_in", "proj_out")
_UNET_FF = ("ff.net.0.proj", "ff.net.2")
UNET_TARGET_PRESETS = {
    "attn": _UNET_ATTN,
    "attn+proj": _UNET_ATTN + _UNET_PROJ,
    "attn+ff": _UNET_ATTN + _UNET_FF,
    "all": _UNET_ATTN + _UNET_PROJ + _UNET_FF,
}
_TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_TARGET_PRESETS = {"attn": _TEXT_ATTN, "attn+mlp": _TEXT_ATTN + ("fc1", "fc2")}


class AdapterError(ValueError):
    """Attaching, loading or validating an adapter failed; nothing was modified."""


@dataclass(frozen=True)
class AdapterConfig:
    """How the adapters of one training run are shaped; validated on construction."""

    kind: str = "moslora"
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1), the diffusers default
    mixer_init: str = "kaiming"
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if self.mixer_init not in MIXER_INITS:
            raise ValueError(f"mixer init must be one of {MIXER_INITS}, got {self.mixer_init!r}")
        check_adapter_numbers(self.rank, self.alpha, self.dropout)
        object.__setattr__(self, "rank", int(self.rank))  # 4.0 from a JSON file is rank 4
        if self.kind == "lora":
            object.__setattr__(self, "mixer_init", "identity")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_targets(spec: str | Sequence[str], presets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A preset name ("attn"), a comma-separated list ("to_q,to_v") or a sequence of module names."""
    if isinstance(spec, str):
        if spec in presets:
            return presets[spec]
        spec = [s.strip() for s in spec.split(",")]
    targets = tuple(s for s in spec if s)
    if not targets:
        raise ValueError(f"no target modules given; presets: {sorted(presets)}")
    return targets


def _matches(name: str, targets: frozenset[str]) -> bool:
    """True when the path itself or one of its dotted tails ("attn1.to_q", "to_q") is a target."""
    parts = name.split(".")
    return any(".".join(parts[i:]) in targets for i in range(len(parts)))


def adapters(model: nn.Module) -> dict[str, MoSLoRALinear]:
    """Adapted layers by the module path they replace (the base model's own names)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoSLoRALinear)}


def target_layers(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every Linear / 1x1 conv whose path ends in a target; AdapterError when there is none.
    Works on a model built on the meta device (shapes only), so a rank can be checked before loading."""
    wanted = frozenset(targets)
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, wanted) and is_adaptable(m)]
    if not found:
        raise AdapterError(f"no adaptable layer in {type(model).__name__} matches targets {list(targets)}")
    return found


def layer_width(layer: nn.Module) -> int:
    """min(in, out) features (channels for a 1x1 conv): the largest rank B (out x r) A (r x in) can have."""
    if isinstance(layer, nn.Conv2d):
        return min(layer.in_channels, layer.out_channels)
    return min(layer.in_features, layer.out_features)


def narrowest_layer(model: nn.Module, targets: Sequence[str]) -> tuple[str, int]:
    """(path, width) of the narrowest layer `targets` select: its width is the largest rank they allow."""
    return min(((name, layer_width(layer)) for name, layer in target_layers(model, targets)), key=lambda t: t[1])


def check_rank(model: nn.Module, rank: int, targets: Sequence[str]) -> None:
    """AdapterError naming the narrowest layer when `rank` exceeds its width; nothing is changed."""
    name, width = narrowest_layer(model, targets)
    if rank > width:
        raise AdapterError(f"rank {rank} is larger than the width of {type(model).__name__}'s {name} ({width}); "
                           f"the largest rank these targets allow is {width}")


def attach(model: nn.Module, config: AdapterConfig, targets: Sequence[str]) -> dict[str, MoSLoRALinear]:
    """Wraps every Linear/1x1-conv whose path ends in a target; freezes everything but the adapters.

    Raises AdapterError (nothing attached) when adapters are attached already, no layer matches, or the rank
    is larger than the narrowest matching layer's width.
    """
    if adapters(model):
        raise AdapterError(f"{type(model).__name__} already has MoSLoRA adapters attached; detach them first")
    found = target_layers(model, targets)
    check_rank(model, config.rank, targets)  # before any layer is replaced
    model.requires_grad_(False)
    for name, module in found:
        layer = MoSLoRALinear(module, config.rank, config.effective_alpha, config.kind, config.mixer_init,
                              config.dropout)
        _replace(model, name, layer)
    step_weights.install(model)
    return adapters(model)


def detach(model: nn.Module) -> None:
    """Puts the original layers back: same state_dict keys, bit-identical values."""
    step_weights.uninstall(model)
    for name, layer in adapters(model).items():
        layer.unmerge()
        _replace(model, name, layer.base_layer)


def bake(model: nn.Module) -> None:
    """Merges every adapter into its base weight for good and removes the wrappers (for export)."""
    step_weights.uninstall(model)
    for name in list(adapters(model)):  # names only: each wrapper is dropped as soon as it is baked
        _replace(model, name, model.get_submodule(name).bake())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def set_scale(model: nn.Module, scale: float) -> None:
    for layer in adapters(model).values():
        layer.set_scale(scale)


def merge(model: nn.Module) -> None:
    for layer in adapters(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in adapters(model).values():
        layer.unmerge()


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for layer in adapters(model).values() for p in (layer.lora_A, layer.lora_M, layer.lora_B)
            if p.requires_grad]
