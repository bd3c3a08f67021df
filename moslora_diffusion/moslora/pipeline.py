"""Adapters across a whole pipeline: the UNet plus the family's text encoder(s)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..models.families import Family, detect_family
from . import inject
from .inject import TEXT_TARGET_PRESETS, UNET_TARGET_PRESETS, AdapterConfig, AdapterError, resolve_targets
from .layer import MoSLoRALinear, is_adaptable
from .token_vectors import detach_token_vectors


def model_components(pipe, family: Family | None = None) -> dict[str, nn.Module]:
    """{"unet": ..., "text_encoder": ..., ["text_encoder_2": ...]} of a diffusers pipeline."""
    family = family or detect_family(pipe)
    return {name: getattr(pipe, name) for name in family.components if getattr(pipe, name, None) is not None}


def attach_to_pipeline(pipe, config: AdapterConfig, unet_targets: str | Sequence[str] = "attn",
                       text_targets: str | Sequence[str] | None = None) -> dict[str, dict[str, MoSLoRALinear]]:
    """Adapts the UNet and, when text_targets is given, every text encoder of the family."""
    components = model_components(pipe)
    if any(inject.adapters(m) for m in components.values()):
        raise inject.AdapterError("this pipeline already has MoSLoRA adapters attached; detach them first")
    wanted = targets_by_component(components, unet_targets, text_targets)
    for name, targets in wanted.items():  # every component checked before any is changed
        inject.check_rank(components[name], config.rank, targets)
    return {name: inject.attach(components[name], config, targets) for name, targets in wanted.items()}


def targets_by_component(components: dict[str, nn.Module], unet_targets: str | Sequence[str] = "attn",
                         text_targets: str | Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """The resolved target names per component ("unet", and each text encoder when text_targets is given)."""
    wanted = {"unet": resolve_targets(unet_targets, UNET_TARGET_PRESETS)}
    if text_targets is not None:
        text = resolve_targets(text_targets, TEXT_TARGET_PRESETS)
        wanted.update({name: text for name in components if name != "unet"})
    return wanted


def _is_flat_clip(model: nn.Module) -> bool:
    return hasattr(model, "final_layer_norm") and not hasattr(model, "text_model")


def canonical_module_name(model: nn.Module, name: str) -> str:
    """A module path as every LoRA reader expects it (`text_model.encoder.layers.0...` for CLIP).

    transformers 5 flattened CLIPTextModel (no `text_model.` level); the files we write keep the
    classic names so they load in A1111, ComfyUI and any diffusers/transformers version.
    """
    return f"text_model.{name}" if _is_flat_clip(model) else name


def model_module_name(model: nn.Module, canonical: str) -> str:
    """Inverse of canonical_module_name for this model's transformers version."""
    if _is_flat_clip(model) and canonical.startswith("text_model."):
        return canonical[len("text_model."):]
    return canonical


def pipeline_adapters(pipe, canonical: bool = False) -> dict[str, dict[str, MoSLoRALinear]]:
    """Adapted layers per component; components without adapters are left out.

    canonical=True names them as files store them (see canonical_module_name).
    """
    found = {}
    for name, model in model_components(pipe).items():
        layers = inject.adapters(model)
        if layers:
            found[name] = {canonical_module_name(model, k) if canonical else k: v for k, v in layers.items()}
    return found


def _each_layer(pipe):
    for layers in pipeline_adapters(pipe).values():
        yield from layers.values()


def set_pipeline_scale(pipe, scale: float) -> None:
    for layer in _each_layer(pipe):
        layer.set_scale(scale)


def merge_pipeline(pipe) -> None:
    for layer in _each_layer(pipe):
        layer.merge()


def unmerge_pipeline(pipe) -> None:
    for layer in _each_layer(pipe):
        layer.unmerge()


def detach_from_pipeline(pipe) -> None:
    """Takes every adapter off, and the trigger word's vectors (pivotal tuning): the base model exactly."""
    for module in model_components(pipe).values():
        inject.detach(module)
    detach_token_vectors(pipe)


def adaptable_module(components: dict[str, nn.Module], component: str, module_name: str, label: str) -> nn.Module:
    """The layer an adapter file names (`module_name` in canonical form) in `components`; AdapterError naming
    `label` (the file) when the component or module is missing or is not a Linear / 1x1 Conv2d a LoRA adapts."""
    if component not in components:
        raise AdapterError(f"{label}: has weights for {component}, which this model does not have")
    model = components[component]
    try:
        module = model.get_submodule(model_module_name(model, module_name))
    except AttributeError:
        raise AdapterError(f"{label}: {component}.{module_name} matches no module of this model: it does not exist "
                           "in this model (made for another base model or architecture?)") from None
    if not is_adaptable(module):
        raise AdapterError(f"{label}: {component}.{module_name} is a {type(module).__name__}, not a Linear or 1x1 "
                           "Conv2d layer a LoRA can adapt")
    return module
