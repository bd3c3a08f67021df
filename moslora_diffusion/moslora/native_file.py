"""The native adapter file: A, M and B of every adapted module plus the run's metadata.

Keys are `<component>.<module path>.moslora_{A,M,B}` (component: unet, text_encoder, text_encoder_2).
Pivotal tuning adds `embeddings.<text encoder>.<word>`: the trigger word's vectors (n distinct tokens, D), with
the word in the metadata as `token_abstraction` (moslora/token_vectors.py).
They deliberately do not look like a diffusers LoRA, so no LoRA loader can silently drop the mixer:
standard LoRA readers get the folded exports instead. The authors' release names the mixer `lora_AB`
in PEFT-style keys (`...lora_A.weight`, `...lora_AB.weight`, `...lora_B.weight`); we read those too.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import SCALE, check_number
from ..files.safetensors_io import load_tensors, save_tensors
from ..models.families import detect_family
from .inject import AdapterConfig, AdapterError, attach
from .pipeline import adaptable_module, model_components, model_module_name, pipeline_adapters
from .token_vectors import check_token_vectors, load_token_vectors, pipeline_token_vectors, token_vector_tensors

FORMAT_VERSION = 1
METADATA_KEY = "moslora"
_PARTS = {"moslora_A": "A", "moslora_M": "M", "moslora_B": "B",  # native
          "lora_A.weight": "A", "lora_AB.weight": "M", "lora_B.weight": "B"}  # the authors' PEFT style
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
EMBEDDINGS_PREFIX = "embeddings."  # pivotal tuning: embeddings.<text encoder>.<word>


@dataclass
class AdapterFile:
    """What an adapter file holds: weights per component and module, and its metadata."""

    weights: dict[str, dict[str, dict[str, torch.Tensor]]]  # component -> module -> {"A","M","B"}
    config: AdapterConfig
    info: dict = field(default_factory=dict)  # family, base_model, targets, instance_prompt, ...
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # text encoder -> the word's vectors (n, D)

    @property
    def token_abstraction(self) -> str | None:
        """The trigger word whose vectors the file holds (pivotal tuning), else None."""
        return self.info.get("token_abstraction") if self.embeddings else None


def save_adapter(pipe, path: str | Path, info: dict | None = None) -> Path:
    """Writes every attached adapter of `pipe` (atomically) with its config and `info` as metadata.

    Raises NonFiniteError, writing nothing, when a weight holds NaN or inf (a diverged training run).
    """
    found = pipeline_adapters(pipe, canonical=True)
    if not found:
        raise AdapterError("the pipeline has no MoSLoRA adapters to save")
    first = next(iter(next(iter(found.values())).values()))
    config = AdapterConfig(first.kind, first.rank, first.alpha, first.mixer_init)
    tensors = {}
    for component, layers in found.items():
        for module, layer in layers.items():
            for part in "AMB":
                tensors[f"{component}.{module}.moslora_{part}"] = getattr(layer, f"lora_{part}").detach().float()
    words = {m.word for m in pipeline_token_vectors(pipe).values()}
    embedding_info = {"token_abstraction": next(iter(words))} if words else {}
    for component, vectors in token_vector_tensors(pipe).items():
        tensors[f"{EMBEDDINGS_PREFIX}{component}.{embedding_info['token_abstraction']}"] = vectors
    meta = {"format_version": FORMAT_VERSION, "family": detect_family(pipe).name, **(info or {}), **embedding_info,
            "config": config.to_dict(),
            "targets": {c: sorted(layers) for c, layers in found.items()}}
    return save_tensors(tensors, path, {METADATA_KEY: json.dumps(meta), "format": "pt"})


def _split_key(key: str) -> tuple[str, str, str]:
    if key.startswith("base_model.model."):  # PEFT's wrapper prefix: a UNet-only file
        key = "unet." + key[len("base_model.model."):]
    for suffix, part in _PARTS.items():
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1].replace(".default", "")
            component, _, module = stem.partition(".")
            if component not in _COMPONENTS:  # no component prefix: the authors' UNet-only files
                component, module = "unet", stem
            return component, module, part
    raise AdapterError(f"unexpected key {key!r} in adapter file (expected *.moslora_A / _M / _B)")


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")  # A1111 / kohya / SDXL embedding files


def not_an_adapter(path: str | Path, keys) -> str | None:
    """What the file is instead, when its tensor names say it is a whole checkpoint or a textual-inversion
    embedding (an unexpected-key message named neither); None otherwise."""
    keys = list(keys)
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        return f"{path} is a whole model checkpoint, not an adapter: give it as --base"
    if keys and all(k.split(".")[0] in EMBEDDING_KEYS for k in keys):
        return (f"{path} is a textual-inversion embedding (a trigger word's vectors), not an adapter: A1111 and "
                "ComfyUI load it as an embedding; here, give the training folder it came from")
    return None


def read_adapter(path: str | Path) -> AdapterFile:
    tensors, metadata = load_tensors(path)
    if not tensors:
        raise AdapterError(f"{path} holds no tensors")
    problem = not_an_adapter(path, tensors)
    if problem:
        raise AdapterError(problem)
    if "mole" in metadata:  # mole/file.py's metadata key
        raise AdapterError(f"{path} is a MoLE file (gates and experts), not one adapter: use python -m "
                           "moslora_diffusion.mole generate / export with --mole")
    plain_peft = any(".lora_A." in k for k in tensors) and not any(".lora_AB." in k for k in tensors)
    if plain_peft or any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):  # (lora_AB: the authors' MoSLoRA)
        raise AdapterError(f"{path} is a standard LoRA file (kohya or diffusers), not a native moslora.safetensors: "
                           "load it with pipe.load_lora_weights, or compose it with python -m moslora_diffusion.mole")
    weights: dict = {}
    embeddings = {key[len(EMBEDDINGS_PREFIX):].split(".", 1)[0]: tensors.pop(key).float()
                  for key in [k for k in tensors if k.startswith(EMBEDDINGS_PREFIX)]}
    for key, tensor in tensors.items():
        component, module, part = _split_key(key)
        weights.setdefault(component, {}).setdefault(module, {})[part] = tensor.float()
    for component, modules in weights.items():
        for module, parts in modules.items():
            missing = sorted(set("AMB") - set(parts))
            if missing:
                raise AdapterError(f"{path}: module {component}.{module} is missing its {'/'.join(missing)} "
                                   "weights (incomplete adapter file)")
    info = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    some = next(iter(next(iter(weights.values())).values()))
    rank = some["A"].shape[0]
    if "config" in info:
        config = AdapterConfig(**info["config"])
    else:
        warnings.warn(f"{path} has no moslora metadata; assuming alpha = rank = {rank}", stacklevel=2)
        config = AdapterConfig(rank=rank)
    if embeddings and not info.get("token_abstraction"):
        raise AdapterError(f"{path} holds trigger-word vectors but not the word (metadata token_abstraction)")
    return AdapterFile(weights, config, info, embeddings)


def validate_against(adapter: AdapterFile, components: dict, path) -> None:
    """Checks every module and shape before anything is modified; names the first mismatch."""
    r = adapter.config.rank
    for component, modules in adapter.weights.items():
        for module_name, parts in modules.items():
            module = adaptable_module(components, component, module_name, str(path))
            out_f, in_f = module.weight.shape[:2]
            expected = {"A": (r, in_f), "M": (r, r), "B": (out_f, r)}
            for part, shape in expected.items():
                if tuple(parts[part].shape) != shape:
                    raise AdapterError(
                        f"{path}: shape mismatch at {component}.{module_name} ({part}: adapter "
                        f"{tuple(parts[part].shape)}, model needs {shape}); the adapter was made for a "
                        "different base model")


def load_adapter(pipe, path: str | Path, scale: float = 1.0) -> AdapterFile:
    """Attaches the adapters stored in `path` to `pipe` and loads their weights.

    Every check (scale, format, family, modules, shapes) runs before the pipeline is touched. A file with
    trigger-word vectors (pivotal tuning) also replaces the word's token rows in the text encoder(s), whatever
    the scale; detach_from_pipeline restores them.
    """
    scale = check_number("adapter scale", scale, SCALE, AdapterError)
    adapter = read_adapter(path)
    if pipeline_adapters(pipe):
        raise AdapterError("this pipeline already has MoSLoRA adapters attached; detach them first")
    family = detect_family(pipe)
    stored_family = adapter.info.get("family")
    if stored_family and stored_family != family.name:
        raise AdapterError(f"{path}: adapter was trained for {stored_family}, but the model is {family.name} "
                           f"({family.label}); use a base model of the same family")
    components = model_components(pipe, family)
    validate_against(adapter, components, path)
    if adapter.embeddings:
        check_token_vectors(pipe, adapter.token_abstraction, adapter.embeddings, str(path))
    for component, modules in adapter.weights.items():
        model = components[component]
        names = {module_name: model_module_name(model, module_name) for module_name in modules}
        layers = attach(model, adapter.config, list(names.values()))
        with torch.no_grad():
            for module_name, parts in modules.items():
                layer = layers[names[module_name]]
                for part, tensor in parts.items():
                    getattr(layer, f"lora_{part}").copy_(tensor)
                layer.set_scale(scale)
    if adapter.embeddings:  # the word's vectors are no delta: they apply whole, at any adapter scale
        load_token_vectors(pipe, adapter.token_abstraction, adapter.embeddings)
    return adapter
