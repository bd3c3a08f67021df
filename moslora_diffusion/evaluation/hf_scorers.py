"""DINO and CLIP scorers, loaded with transformers by hub id or local folder, safetensors only.

Features as in the DreamBooth paper (Ruiz et al., CVPR 2023, section 4.1):
- DINO: `ViTModel` (default `facebook/dino-vits16`, the paper's self-supervised ViT-S/16); the feature of an image
  is the CLS token of the last layer (`last_hidden_state[:, 0]`, after the final layer norm), 384 values for
  ViT-S/16. The pooling head is not used.
- CLIP: `CLIPModel` (default `openai/clip-vit-base-patch32`: the paper does not name its CLIP model; ViT-B/32
  is the model of Textual Inversion's CLIP evaluator (Gal et al., 2022), the baseline DreamBooth compares with,
  and the common choice of later work that reproduces its numbers); image features are
  `get_image_features` (the projected pooled vision output, 512 values for ViT-B/32), text features
  `get_text_features` (the projected end-of-text token). Each model's own processor resizes, crops and
  normalises the images (`AutoImageProcessor` / `AutoProcessor` from the same id or folder).
Similarities are cosine similarities of these features (scorer.FeatureScorer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.loading import check_safetensors_folder
from .scorer import FeatureScorer

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
HUB_FILES = ["*.json", "*.txt", "*.safetensors"]  # configs, processor and tokenizer files, weights: no pickles


def _convert_hint(source: str, model_class: str) -> str:
    return (f"Convert it once, on a machine you trust: python -c \"from transformers import {model_class}; "
            f"{model_class}.from_pretrained('{source}', use_safetensors=False)"
            f".save_pretrained('{source}-safetensors', safe_serialization=True)\"")


def checked_source(source: str | Path, model_class: str) -> str:
    """What the scorer loads: a local model folder holding .safetensors weights (WeightFileError if not: pickle
    weights are refused, never opened), or for a hub id its snapshot (config, processor and safetensors files),
    from the cache, else downloaded (the hub id itself when its safetensors weights live in a conversion branch).
    Called before any image is generated, so an unreachable hub fails at once: OSError naming the model and what
    to do (no retries: offline, HF_HUB_OFFLINE=1, gives the same line)."""
    path = Path(source)
    if path.is_dir():
        check_safetensors_folder(path, _convert_hint(str(path), model_class))
        return str(path)
    if path.exists():
        raise ValueError(f"{source}: give a model folder (config.json and .safetensors weights) or a hub id, "
                         "not a file")
    folder = Path(_hub_snapshot(str(source), model_class))
    if any(folder.glob("*.safetensors")):
        return str(folder)
    # Weights only in the hub's safetensors conversion branch (refs/pr/N): transformers finds them there itself
    # (use_safetensors=True, never a pickle); the hub has answered, so this cannot hang on retries later.
    return str(source)


def _hub_snapshot(repo_id: str, model_class: str) -> str:
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the cache yet
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as err:
        reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
                  " ".join(str(err).split())[:200] or type(err).__name__)
        raise OSError(f"the {model_class} scorer {repo_id!r} is not in the hub cache and could not be downloaded "
                      f"({reason}); run once with network access, or give a local model folder (--dino_model / "
                      "--clip_model DIR)") from None


class DinoScorer(FeatureScorer):
    """DINO image features: the last layer's CLS token of a ViT. Images only (no text)."""

    name = "dino"

    def __init__(self, source: str | Path = DEFAULT_DINO, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import AutoImageProcessor, ViTModel

        super().__init__(batch_size)
        source = checked_source(source, "ViTModel")
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(source)
        self.model = ViTModel.from_pretrained(source, add_pooling_layer=False, use_safetensors=True)
        self.model.eval().to(self.device)

    def _embed_images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]


def _projected(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected feature; 4.x the tensor."""
    return getattr(output, "pooler_output", output)


class ClipScorer(FeatureScorer):
    """CLIP image and text features (projected, as CLIPModel's contrastive head compares them)."""

    name = "clip"
    has_text = True

    def __init__(self, source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import AutoProcessor, CLIPModel

        super().__init__(batch_size)
        source = checked_source(source, "CLIPModel")
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(source)
        self.model = CLIPModel.from_pretrained(source, use_safetensors=True)
        self.model.eval().to(self.device)

    def _embed_images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return _projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        return _projected(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)))
