"""Loading a base model the way users name it: hub id, local diffusers folder or single .safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files.safetensors_io import PICKLE_SUFFIXES, WeightFileError, pickle_refusal, read_keys
from .families import SDXL, Family, ModelInfo, UnsupportedModelError, detect_family, detect_model, get_family


class ModelFolderError(ValueError):
    """A local diffusers folder that lacks a part we need; nothing was loaded."""


class SingleFileConfigError(ValueError):
    """A single-file checkpoint whose model configs are neither given, cached nor downloadable; nothing loaded."""

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
    if any("lora" in k or "moslora_" in k or k.startswith(("gate.", "expert.")) for k in keys):
        raise UnsupportedModelError(f"{path} is an adapter (a LoRA, MoSLoRA or MoLE file), not a base model: give "
                                    "the base model it was trained on, and the adapter with its own flag")
    raise UnsupportedModelError(
        f"unsupported model family: {path} is not an SD 1.x, SD 2.x or SDXL checkpoint (SD3, Flux and others "
        "are not supported)")


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """`dtype=` for diffusers releases that renamed `torch_dtype` (July 2026), `torch_dtype=` before."""
    if dtype is None:
        return {}
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _tokenizer_names(family: Family) -> tuple[str, ...]:
    return tuple(name.replace("text_encoder", "tokenizer") for name in family.text_encoders)


def _convert_hint(folder: Path) -> str:
    source = str(folder)
    return ("Convert the folder once, on a machine you trust: python -c \"from diffusers import DiffusionPipeline; "
            f"DiffusionPipeline.from_pretrained('{source}', use_safetensors=False)"
            f".save_pretrained('{source}-safetensors', safe_serialization=True)\"")


def _check_weights(folder: Path, name: str) -> None:
    check_safetensors_folder(folder / name, _convert_hint(folder))


def check_safetensors_folder(sub: Path, convert_hint: str) -> None:
    """Raises WeightFileError unless the model folder `sub` holds .safetensors weights (single, sharded or a
    variant such as *.fp16.safetensors); a folder of pickle weights only is refused with `convert_hint`."""
    if any(sub.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise WeightFileError(f"{sub} holds only pickle weights ({', '.join(pickles)}), which can run code when "
                              f"loaded; moslora-diffusion loads .safetensors only. {convert_hint}")
    raise WeightFileError(f"{sub} holds no weights: expected a .safetensors file next to its config.json")


def check_pipeline_folder(folder: str | Path) -> ModelInfo:
    """Family and prediction type of a local diffusers folder, once every part we load is there.

    Reads only small files: model_index.json, the configs, the names of the weight files. Raises
    UnsupportedModelError (no model_index.json, another family), ModelFolderError (a component's sub-folder
    or config is missing) or WeightFileError (a model's weights are pickle files only, or absent).
    """
    folder = Path(folder).expanduser()
    info = detect_model(folder)
    family = info.family
    models = ("unet", "vae") + family.text_encoders
    parts = models + _tokenizer_names(family) + ("scheduler",)
    layout = ", ".join(f"{name}/" for name in parts)
    for name in parts:
        if not (folder / name).is_dir():
            raise ModelFolderError(
                f"{folder} has no {name}/ folder: a diffusers {family.label} folder holds model_index.json and "
                f"one sub-folder per component ({layout}), each with its config and, for the models, .safetensors "
                "weights; copy the whole folder, or pass a single .safetensors checkpoint instead")
    for name in models:
        if not (folder / name / "config.json").is_file():
            raise ModelFolderError(f"{folder / name} has no config.json: copy the whole diffusers folder")
        _check_weights(folder, name)
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ModelFolderError(f"{folder / 'scheduler'} has no scheduler_config.json: copy the whole diffusers folder")
    return info


def empty_components(folder: str | Path, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Components of a diffusers folder (e.g. "unet", "text_encoder") built from their configs on the meta
    device: every layer with its shape, no weight read and no memory used. For checks before loading."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = Path(folder).expanduser()
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    built = {}
    with init_empty_weights():
        for name in names:
            library, class_name = index[name]
            if library == "transformers":
                cls = getattr(transformers, class_name)
                built[name] = cls(cls.config_class.from_pretrained(folder / name))
            else:
                cls = getattr(diffusers, class_name)
                built[name] = cls.from_config(cls.load_config(folder / name))
    return built


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
        raise WeightFileError(pickle_refusal(path))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise WeightFileError(f"{path}: expected a .safetensors checkpoint or a diffusers folder")
        family = family_of_single_file(path)
        config = config if config else _single_file_configs(path)
        pipe = _pipeline_class(family).from_single_file(str(path), config=str(config), **kwargs)
    elif path.is_dir():
        family = check_pipeline_folder(path).family
        if family is not SDXL:  # its NSFW checker is dropped below anyway: never read (its weights are often .bin)
            kwargs.update(safety_checker=None, requires_safety_checker=False)
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


# The files diffusers reads from a model folder to build a single file's pipeline (no weights).
_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def _default_config_repo(path: Path) -> str:
    """The hub model whose configs diffusers pairs with this single file (told by tensor shapes; no weight read)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    return fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]


def _single_file_configs(path: Path) -> str:
    """A local folder with the configs for a single file given without `config`: the hub cache's copy of the
    model diffusers would pair it with, else (online) a download of those small files. Raises
    SingleFileConfigError, one line naming --config, where neither works (offline, no cache): diffusers
    would print its own paragraphs and a network error instead."""
    from huggingface_hub import constants, snapshot_download

    repo = _default_config_repo(path)
    needed = (f"{path} is a single file without its model configs here: pass --config DIR "
              "(--single_file_config DIR for training), a diffusers model folder of the same family, e.g. the "
              f"one it was exported from")
    try:
        return snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS, local_files_only=True)
    except Exception:  # not in the hub cache (LocalEntryNotFoundError and the like)
        pass
    if constants.HF_HUB_OFFLINE:
        raise SingleFileConfigError(f"{needed} (offline: {repo}'s configs are not cached)")
    try:
        return snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS)
    except Exception as err:  # no network, hub refused: httpx, requests and hub errors alike
        raise SingleFileConfigError(f"{needed} ({repo}'s configs are not cached and could not be downloaded: "
                                    f"{type(err).__name__})") from None


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
