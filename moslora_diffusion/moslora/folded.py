"""A LoRA folded to plain factors per layer: the one representation the app's fusion, the LoRA exports and
MoLE share.

A trained MoSLoRA layer folds exactly into a plain rank-r LoRA, B M A = (B M) A, so everything downstream of
training only ever sees (down, up) pairs: `FoldedLoRA` is one layer, `FoldedAdapter` one adapter file (or one
standard LoRA file, or one MoLE expert) keyed by (component, module path). Module paths are the canonical
ones files store (`text_model.encoder.layers.N...` even on transformers 5's flat CLIPTextModel); use
`model_module_name` to find the module in a given model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .inject import AdapterError
from .native_file import AdapterFile
from .pipeline import adaptable_module

LayerKey = tuple[str, str]  # (component: unet / text_encoder / text_encoder_2, canonical module path)


@dataclass
class FoldedLoRA:
    """A plain LoRA for one layer: delta = (alpha / rank) * up @ down (fp32, 2-D factors)."""

    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    alpha: float
    weight_shape: tuple[int, ...]  # the base weight's shape (4-D for 1x1 convolutions)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def baked_up(self) -> torch.Tensor:
        return self.up * (self.alpha / self.rank)

    def baked(self) -> FoldedLoRA:
        """The same delta with alpha / rank folded into up (alpha = rank): delta = up @ down."""
        return FoldedLoRA(self.down, self.baked_up(), float(self.rank), self.weight_shape)

    def scaled(self, scale: float) -> FoldedLoRA:
        return FoldedLoRA(self.down, self.up * scale, self.alpha, self.weight_shape)

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in fp32, shaped like the base weight."""
        return (self.baked_up() @ self.down).reshape(self.weight_shape)

    def as_weight_shape(self, matrix: torch.Tensor) -> torch.Tensor:
        """1x1 conv LoRAs are stored as (r, in, 1, 1) / (out, r, 1, 1) like the layers they adapt."""
        return matrix[:, :, None, None] if len(self.weight_shape) == 4 else matrix


@dataclass
class FoldedAdapter:
    """One adapter (a native MoSLoRA file, a diffusers or kohya LoRA file, a MoLE expert) as plain LoRA factors."""

    name: str
    path: Path | None
    layers: dict[LayerKey, FoldedLoRA]
    info: dict = field(default_factory=dict)  # the file's metadata (instance_prompt, family, ...)

    def delta(self, key: LayerKey) -> torch.Tensor:
        """The layer's weight delta (alpha / r) * up @ down, fp32, shaped like the base weight."""
        return self.layers[key].delta()

    def by_component(self) -> dict[str, dict[str, FoldedLoRA]]:
        """component -> module -> FoldedLoRA: the form the LoRA writers (formats/lora.py) take."""
        nested: dict[str, dict[str, FoldedLoRA]] = {}
        for (component, module), lora in self.layers.items():
            nested.setdefault(component, {})[module] = lora
        return nested

    def to(self, devices: dict[str, torch.device]) -> FoldedAdapter:
        """The factors moved to each component's device (component -> device)."""
        layers = {key: FoldedLoRA(lora.down.to(devices[key[0]]), lora.up.to(devices[key[0]]), lora.alpha,
                                  lora.weight_shape) for key, lora in self.layers.items()}
        return FoldedAdapter(self.name, self.path, layers, self.info)


def fold_adapter_file(adapter: AdapterFile, name: str, path: Path | None) -> FoldedAdapter:
    """The exact fold up = B M, down = A of every layer of a native adapter file (fp32, on the CPU).

    Raises AdapterError on non-finite weights. Shapes are checked by `native_file.validate_against`
    (or `validate_folded`) against a model.
    """
    layers = {}
    for component, modules in adapter.weights.items():
        for module, parts in modules.items():
            rank = parts["A"].shape[0]
            if parts["B"].shape[1] != rank or tuple(parts["M"].shape) != (rank, rank):
                shapes = ", ".join(f"{p} {tuple(parts[p].shape)}" for p in "AMB")
                raise AdapterError(f"{path or name}: {component}.{module} has inconsistent ranks ({shapes}): a damaged "
                                   "adapter file")
            up = parts["B"] if adapter.config.kind == "lora" else parts["B"] @ parts["M"]
            down = parts["A"]
            shape = (up.shape[0], down.shape[1])
            layers[(component, module)] = FoldedLoRA(down.float().contiguous(), up.float().contiguous(),
                                                     adapter.config.effective_alpha, shape)
    folded = FoldedAdapter(name, None if path is None else Path(path), layers, adapter.info)
    check_finite(folded)
    return folded


def check_finite(folded: FoldedAdapter) -> None:
    for (component, module), lora in folded.layers.items():
        if not (torch.isfinite(lora.up).all() and torch.isfinite(lora.down).all()):
            raise AdapterError(f"{folded.path or folded.name}: {component}.{module} has NaN or inf weights "
                               "(a diverged training run?)")


def validate_folded(folded: FoldedAdapter, components: dict[str, nn.Module], label: str) -> None:
    """Every layer must name an adaptable module (nn.Linear / 1x1 Conv2d) of the model with matching shapes.

    Sets each FoldedLoRA's weight_shape to the module's (2-D or 4-D). Raises AdapterError naming `label`
    (the file) and the first mismatch; modifies nothing else.
    """
    for (component, module_name), lora in folded.layers.items():
        module = adaptable_module(components, component, module_name, label)
        out_f, in_f = module.weight.shape[:2]
        if lora.down.shape[1] != in_f or lora.up.shape[0] != out_f or lora.up.shape[1] != lora.rank:
            raise AdapterError(f"{label}: shape mismatch at {component}.{module_name} (down {tuple(lora.down.shape)}, "
                               f"up {tuple(lora.up.shape)}; the layer is {out_f} x {in_f}): made for another "
                               "base model")
        lora.weight_shape = tuple(module.weight.shape)
