"""Loading a base model the way users name it: hub id, local diffusers folder or single .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..files.safetensors_io import PICKLE_SUFFIXES, WeightFileError, read_keys
from .families import SDXL, Family, UnsupportedModelError, detect_family, detect_model, get_family

# A key that only one layout has tells the family of a single-file checkpoint.
_SINGLE_FILE_MARKERS = (
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ("cond_stage_model.model.ln_final.weight", "sd2"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
    ("cond_stage_model.transformer.final_layer_norm.weight", "sd1"),
)


def family_of_single_file(path: str | Path) -> Family:
    keys = read_keys(path)
    for marker, name in _SINGLE_FILE_MARKERS:
        if marker in keys:
            return get_family(name)
    raise UnsupportedModelError(
        f"unsupported model family: {path} is not an SD 1.x, SD 2.x or SDXL checkpoint (SD3, Flux and others "
        "are not supported)")


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """`dtype=` for diffusers releases that renamed `torch_dtype` (July 2026), `torch_dtype=` before."""
    if dtype is None:
        return {}
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _pipeline_class(family: Family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family is SDXL else StableDiffusionPipeline


def load_pipeline(source: str | Path, *, revision: str | None = None, variant: str | None = None,
                  vae: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                  config: str | Path | None = None):
    """A diffusers pipeline of a supported family, loaded with safetensors only.

    config: for a single file, a diffusers folder or hub id holding the matching configs (needed
    offline; online diffusers finds it itself).
    """
    path = Path(str(source)).expanduser()
    kwargs = dtype_kwargs(torch_dtype)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightFileError(f"{path}: pickle checkpoints ({path.suffix}) can run code when loaded; "
                              "convert it to .safetensors first")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise WeightFileError(f"{path}: expected a .safetensors checkpoint or a diffusers folder")
        family = family_of_single_file(path)
        pipe = _pipeline_class(family).from_single_file(str(path), config=str(config) if config else None,
                                                        **kwargs)
    elif path.is_dir():
        family = detect_model(path).family
        pipe = _pipeline_class(family).from_pretrained(str(path), variant=variant, use_safetensors=True,
                                                       **kwargs)
    elif path.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such model folder or file (and not a hub id like 'org/name')")
    else:  # a hub id: the real download path, which needs a network
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(source), revision=revision, variant=variant,
                                                 use_safetensors=True, **kwargs)
        family = detect_family(pipe)
    if vae is not None:
        pipe.vae = _load_vae(vae, revision=None, dtype=torch_dtype)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # generation previews of a personal subject need no NSFW filter pass
    detect_family(pipe)  # refuses anything that slipped through (e.g. a hub id of another family)
    return pipe


def _load_vae(source: str | Path, revision: str | None, dtype: torch.dtype | None):
    """A separate VAE (e.g. the SDXL fp16-fix VAE) from a hub id, folder or single file."""
    from diffusers import AutoencoderKL

    kwargs = dtype_kwargs(dtype)
    path = Path(str(source))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise WeightFileError(f"{path}: the VAE must be a .safetensors file or a diffusers folder")
        return AutoencoderKL.from_single_file(str(path), **kwargs)
    return AutoencoderKL.from_pretrained(str(source), revision=revision, use_safetensors=True, **kwargs)
