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


def _convert_hint(source: str, model_class: str) -> str:
    return (f"Convert it once, on a machine you trust: python -c \"from transformers import {model_class}; "
            f"{model_class}.from_pretrained('{source}', use_safetensors=False)"
            f".save_pretrained('{source}-safetensors', safe_serialization=True)\"")


def checked_source(source: str | Path, model_class: str) -> str:
    """`source` as a string after checking a local folder holds .safetensors weights (WeightFileError if not:
    pickle weights are refused, never opened). A hub id is passed on: transformers then loads it with
    use_safetensors=True and fails (OSError) where the repository has no safetensors weights."""
    path = Path(source)
    if path.is_dir():
        check_safetensors_folder(path, _convert_hint(str(path), model_class))
    elif path.exists():
        raise ValueError(f"{source}: give a model folder (config.json and .safetensors weights) or a hub id, "
                         "not a file")
    return str(source)


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
