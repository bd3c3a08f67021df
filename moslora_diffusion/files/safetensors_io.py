"""Reading user-supplied weight files (safetensors only) and writing them through the atomic writer.

Pickle-based formats (.bin, .ckpt, .pt, .pth) can run code when loaded, so we never open them. Every
write goes through files/atomic.py, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_write

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class WeightFileError(ValueError):
    """A weights file is missing, not safetensors, or damaged."""


class NonFiniteError(WeightFileError):
    """Weights about to be written hold NaN or inf values (a diverged training run, an fp16 overflow)."""


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # float8: isfinite has no kernel for it everywhere
        tensor = tensor.to(torch.float16)
    return bool(torch.isfinite(tensor).all())


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raises NonFiniteError naming the first tensor with a NaN or inf value: no file we write may hold one
    (a NaN adapter loads without complaint everywhere and draws black or noise images)."""
    for key, tensor in tensors.items():
        if not _all_finite(tensor):
            raise NonFiniteError(f"refusing to write {path}: {key} holds NaN or inf values (a diverged training "
                                 "run, or a value too large for the chosen dtype); nothing was written")


def pickle_refusal(path: Path) -> str:
    """The one wording, in every command, for a pickle weights file (.ckpt, .bin, .pt, ...) handed to us."""
    return (f"{path}: only .safetensors files are accepted; pickle files ({path.suffix}) can run code when loaded: "
            "convert it to .safetensors first")


def _check_readable(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightFileError(pickle_refusal(path))
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")


def _open_error(path: Path, err: Exception) -> WeightFileError:
    return WeightFileError(f"{path} is not a valid safetensors file (damaged or truncated?): {err}")


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error type for bad headers and short files
        raise _open_error(path, err) from None


def read_keys(path: str | Path) -> set[str]:
    """The tensor names of a safetensors file, without reading any tensor data."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as err:
        raise _open_error(path, err) from None


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with a clear error for anything else."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:
        raise _open_error(path, err) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None,
                 overwrite: bool = True) -> Path:
    """Atomic safetensors write; metadata values that are not strings are stored as JSON.

    Raises NonFiniteError (before anything is written) when a floating-point tensor holds NaN or inf.
    """
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(tensors, path)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), needed, overwrite)


def save_nested(obj, path: str | Path, overwrite: bool = True) -> Path:
    """Atomically stores a nested state (an optimizer/scheduler state_dict: dicts, lists, numbers,
    strings, tensors) as safetensors: tensors as tensors, the rest as a JSON skeleton in the metadata.
    Unlike torch.save, reading it back can never run code."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x):
        if torch.is_tensor(x):
            key = f"t{len(tensors)}"
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, dict):  # as pairs: optimizer states use int keys, which JSON objects would turn to str
            return {"__dict__": [[k, encode(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [encode(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a safetensors state file")

    return save_tensors(tensors, path, {"nested": json.dumps(encode(obj))}, overwrite=overwrite)


def load_nested(path: str | Path, device: str = "cpu"):
    """Inverse of save_nested."""
    tensors, metadata = load_tensors(path, device)
    if "nested" not in metadata:
        raise WeightFileError(f"{path} is not a saved state (no 'nested' metadata)")

    def decode(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            return {k: decode(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [decode(v) for v in x]
        return x

    return decode(json.loads(metadata["nested"]))
