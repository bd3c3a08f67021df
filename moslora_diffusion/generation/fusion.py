"""Adapters fused into a pipeline's plain weights, with live per-adapter scales.

Generation must run at base-model speed at any scale, so no MoSLoRALinear wrappers are used here:
every touched layer is an ordinary nn.Linear / 1x1 Conv2d whose weight is rewritten as

    W = W0 + sum_i s_i * delta_i,    delta_i = (alpha_i / r_i) * (B_i M_i) @ A_i

in fp32 from the kept original W0 and cast once to the weight dtype. Each write starts from W0, so
moving a slider any number of times never drifts, and scale 0 everywhere restores W0 bit for bit.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ..checks import SCALE, check_number
from ..models.families import detect_family
from ..moslora.folded import FoldedAdapter, LayerKey, fold_adapter_file, validate_folded
from ..moslora.inject import AdapterError
from ..moslora.native_file import read_adapter, validate_against
from ..moslora.pipeline import model_components, model_module_name
from ..moslora.token_vectors import check_token_vectors, detach_token_vectors, load_token_vectors


class FusedAdapters:
    """Keeps W0 of every touched layer once, each adapter's folded factors, and rewrites weights on demand.

    Thread-safe: a lock guards weight writes, and `locked()` lets a caller hold the weights steady
    across a whole generation.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = detect_family(pipe)
        self.components = model_components(pipe, self.family)
        self.adapters: dict[str, FoldedAdapter] = {}  # insertion order = slider order
        self.scales: dict[str, float] = {}
        self._originals: dict[LayerKey, torch.Tensor] = {}
        self.vectors_of: str | None = None  # the adapter whose trigger-word vectors (pivotal tuning) are attached
        self._lock = threading.RLock()

    def locked(self):
        return self._lock

    def names(self) -> list[str]:
        return list(self.adapters)

    def _module(self, key: LayerKey) -> nn.Module:
        component, module = key  # canonical names, as files store them
        model = self.components[component]
        return model.get_submodule(model_module_name(model, module))

    def add(self, name: str, path: str | Path, scale: float = 0.0) -> FoldedAdapter:
        """Reads, checks (family, modules, shapes) and registers an adapter; on any error nothing changes."""
        scale = _checked(scale, name)
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(path)
        stored = adapter.info.get("family")
        if stored and stored != self.family.name:
            raise AdapterError(f"{path}: adapter was trained for {stored}, but the model is {self.family.name} "
                               f"({self.family.label}); use a base model of the same family")
        validate_against(adapter, self.components, path)
        if adapter.embeddings:  # one word's vectors at a time: they replace its token rows, whatever the slider
            if self.vectors_of is not None:
                raise AdapterError(f"{path}: learned vectors for {adapter.token_abstraction!r}, but {self.vectors_of!r}"
                                   " already brings its trigger word's vectors; unload it first")
            check_token_vectors(self.pipe, adapter.token_abstraction, adapter.embeddings, str(path))
        folded = self.add_folded(fold_adapter_file(adapter, name, Path(path)), scale)
        if adapter.embeddings:
            load_token_vectors(self.pipe, adapter.token_abstraction, adapter.embeddings)
            self.vectors_of = name
        return folded

    def add_folded(self, folded: FoldedAdapter, scale: float = 0.0) -> FoldedAdapter:
        """Registers an adapter already folded to plain LoRA factors (a standard LoRA file, a static MoLE fold)
        under `folded.name`; modules and shapes are checked first, and on any error nothing changes."""
        scale = _checked(scale, folded.name)
        if folded.name in self.adapters:
            raise AdapterError(f"an adapter named {folded.name!r} is already loaded")
        validate_folded(folded, self.components, str(folded.path or folded.name))
        devices = {c: next(m.parameters()).device for c, m in self.components.items()}
        folded = folded.to(devices)
        with self._lock:
            for key in folded.layers:
                if key not in self._originals:
                    self._originals[key] = self._module(key).weight.detach().clone()
            self.adapters[folded.name] = folded
            self.scales[folded.name] = 0.0
            self.set_scales({folded.name: scale})
        return folded

    def remove(self, name: str) -> None:
        """Unloads an adapter; layers no other adapter touches get W0 back and their copy is dropped."""
        with self._lock:
            if name not in self.adapters:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            self.set_scales({name: 0.0})
            folded = self.adapters.pop(name)
            self.scales.pop(name)
            still_used = {key for a in self.adapters.values() for key in a.layers}
            for key in folded.layers:
                if key not in still_used:
                    self._originals.pop(key)
            if self.vectors_of == name:
                detach_token_vectors(self.pipe)
                self.vectors_of = None

    def set_scales(self, scales: dict[str, float]) -> int:
        """Applies new scales; only layers of adapters whose scale changed are rewritten. Returns that count."""
        unknown = sorted(set(scales) - set(self.adapters))
        if unknown:
            loaded = ", ".join(self.adapters) or "none"
            raise AdapterError(f"unknown adapter(s): {', '.join(unknown)}; loaded: {loaded}")
        new = {name: _checked(value, name) for name, value in scales.items()}
        with self._lock:
            changed = [name for name, value in new.items() if value != self.scales[name]]
            self.scales.update(new)
            keys = {key for name in changed for key in self.adapters[name].layers}
            for key in keys:
                self._write(key)
            return len(keys)

    @torch.no_grad()
    def _write(self, key: LayerKey) -> None:
        original = self._originals[key]
        weight = self._module(key).weight
        active = [(a, self.scales[n]) for n, a in self.adapters.items() if key in a.layers and self.scales[n] != 0]
        if not active:
            weight.copy_(original)  # exactly the base weight, not a round trip through fp32
            return
        total = original.float()
        for adapter, scale in active:
            total = total + scale * adapter.delta(key).view_as(original)
        weight.copy_(total.to(weight.dtype))

    def reset(self) -> None:
        """All scales to 0: the base model's exact weights."""
        self.set_scales(dict.fromkeys(self.adapters, 0.0))


def _checked(value, name: str) -> float:
    return check_number(f"scale of {name!r}", value, SCALE, AdapterError)
