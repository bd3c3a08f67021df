"""Everything that differs between SD 1.x, SD 2.x and SDXL, in one place, and how to tell them apart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnsupportedModelError(ValueError):
    """The model is not SD 1.x, SD 2.x or SDXL."""


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2" or "sdxl": stored in adapter files
    label: str
    pipeline_class: str
    text_encoders: tuple[str, ...]  # pipeline attributes, also the diffusers LoRA key prefixes
    kohya_text_prefixes: tuple[str, ...]  # one per text encoder, same order
    # kohya's own trainer names SD 1.x/2.x UNet modules the diffusers way and SDXL ones the LDM way
    # (input_blocks/middle_block/output_blocks); we write what kohya writes.
    kohya_unet_naming: str  # "diffusers" or "ldm"
    default_resolution: int

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet",) + self.text_encoders


SD1 = Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", ("text_encoder",), ("lora_te",),
             "diffusers", 512)
SD2 = Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", ("text_encoder",), ("lora_te",),
             "diffusers", 768)
SDXL = Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
              ("lora_te1", "lora_te2"), "ldm", 1024)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"

    @property
    def default_resolution(self) -> int:
        # SD 2.x base (512 px) predicts epsilon; the 768 px models predict v.
        if self.family is SD2 and self.prediction_type == "epsilon":
            return 512
        return self.family.default_resolution


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}") from None


def _family_from_configs(pipeline_class: str, text_encoder_config: dict, unet_config: dict) -> Family:
    if pipeline_class in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"):
        return SDXL
    if pipeline_class not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise UnsupportedModelError(
            f"unsupported model family: {pipeline_class or 'unknown pipeline'}; moslora-diffusion supports "
            "SD 1.x, SD 2.x and SDXL (StableDiffusionPipeline / StableDiffusionXLPipeline)")
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    # SD 2.x swapped OpenAI CLIP (quick_gelu) for OpenCLIP (gelu) and uses linear transformer projections.
    if text_encoder_config.get("hidden_act") == "gelu" or unet_config.get("use_linear_projection"):
        return SD2
    return SD1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise UnsupportedModelError(f"{path} is not valid JSON: {err}") from None


def detect_model(source) -> ModelInfo:
    """Family and prediction type of a diffusers pipeline object or a diffusers model folder."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        index = _read_json(folder / "model_index.json")
        if not index:
            raise UnsupportedModelError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json); pass a diffusers "
                "folder, a hub id or a single .safetensors checkpoint")
        family = _family_from_configs(index.get("_class_name", ""),
                                      _read_json(folder / "text_encoder" / "config.json"),
                                      _read_json(folder / "unet" / "config.json"))
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    else:
        unet = getattr(source, "unet", None)
        if unet is None:
            raise UnsupportedModelError(
                f"unsupported model family: {type(source).__name__} has no UNet; supported: SD 1.x, SD 2.x, SDXL")
        text_encoder = getattr(source, "text_encoder", None)
        family = _family_from_configs(type(source).__name__,
                                      text_encoder.config.to_dict() if text_encoder is not None else {},
                                      dict(unet.config))
        scheduler = dict(source.scheduler.config) if getattr(source, "scheduler", None) is not None else {}
    return ModelInfo(family, scheduler.get("prediction_type", "epsilon"))


def detect_family(source) -> Family:
    return detect_model(source).family


def native_size(pipe, family_default: int) -> int:
    """The size the model was trained at (UNet sample size x VAE factor, as diffusers' own default), which is
    the family's resolution for every real checkpoint (512 / 768 / 1024) and small for the tiny test models."""
    try:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    except (AttributeError, TypeError):
        return family_default
    return min(max(64, size - size % 8), 2048)
