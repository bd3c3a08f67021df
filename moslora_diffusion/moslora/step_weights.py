"""Adapter weights in the compute dtype, formed once per forward pass of the adapted model.

Left to itself, each adapter call casts A, M and B to the compute dtype and multiplies M A: a handful of tiny
ops per layer. When the GPU waits on the CPU to launch kernels (a full UNet at batch 1 on an H100 runs at about
1% of its FLOP rate), every op costs time. A forward pre-hook on the adapted model instead forms M A and B for all
of its adapters in a few batched ops (one bmm per group of equal shapes) and hands each layer its slices.

A layer uses its slices only while they are current: same compute dtype, parameters not modified since (their
version counters), built with autograd on if autograd is on now. Otherwise it computes its own weights, as
before; both paths give the same values. Gradient checkpointing must be non-reentrant (diffusers' default; our
trainer asks transformers for it too): its recomputation then reuses the slices, op for op. A reentrant
checkpoint would backpropagate through the shared batched ops once per segment and fails loudly on the second;
`uninstall(model)` opts a model out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layer import MoSLoRALinear

HOOK_ATTRIBUTE = "_moslora_step_weights_hook"


@dataclass(frozen=True)
class LayerWeights:
    down: torch.Tensor  # M A (A for plain LoRA), r x in, compute dtype
    up: torch.Tensor  # B, out x r, compute dtype (the scaling is applied by the layer)
    dtype: torch.dtype
    with_grad: bool
    versions: tuple[int, ...]

    def __deepcopy__(self, memo):  # a copied model starts without (it could not copy tensors with a graph)
        return None

    def usable(self, layer: MoSLoRALinear, dtype: torch.dtype) -> bool:
        return (dtype == self.dtype and (self.with_grad or not torch.is_grad_enabled())
                and self.versions == parameter_versions(layer))


def parameter_versions(layer: MoSLoRALinear) -> tuple[int, ...]:
    return layer.lora_A._version, layer.lora_M._version, layer.lora_B._version


def compute_dtype(model: nn.Module, layers: list[MoSLoRALinear]) -> torch.dtype:
    """The dtype the layers' outputs will have: autocast's if it is on for their device, else the base's.

    The hook runs before accelerate's autocast wrapper is entered, where a bf16/fp16 base already tells the
    compute dtype; a float8 base (--fp8_base) does not, so the norms' dtype stands in for it."""
    device_type = layers[0].lora_A.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = layers[0].base_layer.weight.dtype
    if dtype.itemsize == 1:  # float8 storage (--fp8_base): compute in the dtype of the weights left as they were
        return next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype.itemsize > 1
                     and not p.requires_grad), torch.float32)
    return dtype


def _grouped(layers: list[MoSLoRALinear], key) -> dict:
    groups: dict = {}
    for layer in layers:
        groups.setdefault(key(layer), []).append(layer)
    return groups


class StepWeights:
    """The forward pre-hook: refreshes every layer's LayerWeights before each forward pass of `model`."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, MoSLoRALinear)]
        self.model = model

    def __call__(self, module: nn.Module, args) -> None:
        self.refresh()

    def refresh(self) -> None:
        active = [layer for layer in self.layers if not layer.merged and layer.scale != 0]
        if not active:
            return
        dtype, with_grad = compute_dtype(self.model, active), torch.is_grad_enabled()
        downs: dict[MoSLoRALinear, torch.Tensor] = {}
        for (kind, *_), group in _grouped(active, lambda m: (m.kind, tuple(m.lora_A.shape), m.lora_A.device)).items():
            # Cast before the bmm: autograd then keeps compute-dtype copies for backward, as autocast would.
            stacked = torch.stack([m.lora_A for m in group]).to(dtype)
            if kind == "moslora":
                stacked = torch.bmm(torch.stack([m.lora_M for m in group]).to(dtype), stacked)
            downs.update(zip(group, stacked.unbind(0), strict=True))
        for group in _grouped(active, lambda m: (tuple(m.lora_B.shape), m.lora_B.device)).values():
            for layer, up in zip(group, torch.stack([m.lora_B for m in group]).to(dtype).unbind(0), strict=True):
                layer.step_weights = LayerWeights(downs[layer], up, dtype, with_grad, parameter_versions(layer))


def install(model: nn.Module) -> None:
    """(Re)registers the hook on `model` for the adapters it holds now."""
    uninstall(model)
    hook = StepWeights(model)
    if hook.layers:
        setattr(model, HOOK_ATTRIBUTE, model.register_forward_pre_hook(hook))


def uninstall(model: nn.Module) -> None:
    handle = getattr(model, HOOK_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()
        delattr(model, HOOK_ATTRIBUTE)
    for layer in model.modules():
        if isinstance(layer, MoSLoRALinear):
            layer.step_weights = None
