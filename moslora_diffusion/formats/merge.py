"""Load one or more adapters, each at its own scale, and bake them into a pipeline's weights.

Only one set of adapters can be attached at a time, so each adapter is attached, baked into the base
weights (the delta s * (alpha / r) * B M A, computed in fp32) and removed before the next one:
W' = W + s1 * delta1 + s2 * delta2 + ...
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..checks import SCALE, check_number
from ..moslora import inject
from ..moslora.inject import AdapterError
from ..moslora.native_file import AdapterFile, load_adapter
from ..moslora.pipeline import model_components
from ..moslora.token_vectors import bake_token_vectors

ADAPTER_FILE_NAME = "moslora.safetensors"  # inside a training output folder


def resolve_adapter_path(path: str | Path) -> Path:
    """A training output folder means its `moslora.safetensors`; a file is taken as it is."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "mole.safetensors").is_file() and not (path / ADAPTER_FILE_NAME).is_file():
            raise AdapterError(f"{path} holds a MoLE (mole.safetensors), not an adapter: export it with `python -m "
                               f"moslora_diffusion.mole export --mole {path} --to ...`")
        if not (path / ADAPTER_FILE_NAME).is_file():
            raise AdapterError(f"adapter folder {path} has no {ADAPTER_FILE_NAME} (is it a training output folder?)")
        return path / ADAPTER_FILE_NAME
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    return path


def given_twice(files: Sequence[Path]) -> str | None:
    """The first (sorted) adapter file named more than once in `files` (resolved paths), or None."""
    twice = sorted({str(f) for f in files if files.count(f) > 1})
    return twice[0] if twice else None


def bake_adapters(pipe, adapters: Sequence[tuple[str | Path, float]]) -> list[AdapterFile]:
    """Merges each (adapter path, scale) into the pipeline's weights for good, in order.

    The pipeline keeps its dtype: each delta is computed and added in fp32, then the weight is rounded
    back once per adapter. Raises AdapterError (naming the file) for an adapter of another family or
    architecture.
    """
    if not adapters:
        raise AdapterError("no adapter given to merge")
    if any(inject.adapters(m) for m in model_components(pipe).values()):
        raise AdapterError("the pipeline already has MoSLoRA adapters attached; detach or bake them first")
    # Every path and scale is checked first: a bad second adapter fails before the first one is merged.
    resolved = [(resolve_adapter_path(path), check_number(f"scale of adapter {str(path)!r}", scale, SCALE,
                                                          AdapterError)) for path, scale in adapters]
    loaded = []
    for path, scale in resolved:
        loaded.append(load_adapter(pipe, path, scale))
        for module in model_components(pipe).values():
            inject.bake(module)
        bake_token_vectors(pipe)  # pivotal tuning: the trigger word's rows become its learned vectors
    return loaded
