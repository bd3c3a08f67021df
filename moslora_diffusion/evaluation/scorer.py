"""One interface for every image scorer: image features, image-image similarity, image-text similarity.

    scorer.image_features(images)               # (N, D) float32, on the CPU
    scorer.image_similarity(generated, photos)  # (N, M): similarity of generated i to reference j
    scorer.text_similarity(images, prompts)     # (N,): similarity of image i to prompt i

A feature scorer (DINO, CLIP: hf_scorers.py) compares L2-normalised features by cosine similarity; the toy
scorer (toy_scorer.py) reads the pixels with the toy world's checker instead. Images are PIL images;
everything is computed without gradients, in batches of `batch_size`, on the scorer's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


class ScorerError(ValueError):
    """A scorer that cannot answer the question asked (a text question to an image-only model, an empty list)."""


@runtime_checkable
class Scorer(Protocol):
    name: str  # how reports name it, e.g. "dino", "clip", "toy"

    def image_features(self, images: Sequence) -> torch.Tensor:
        """(N, D) float32 features of N images, on the CPU."""

    def image_similarity(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        """(N, M) similarity of each of N generated images to each of M reference images."""

    def text_similarity(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) similarity of image i to prompt i (N images, N prompts)."""


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of the rows of a (N, D) and b (M, D), in float32."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def in_batches(items: Sequence, batch_size: int, embed) -> torch.Tensor:
    """embed(batch) -> (B, D) for each batch of `items`, concatenated on the CPU: (len(items), D)."""
    if not items:
        raise ScorerError("nothing to score: the list of images or prompts is empty")
    with torch.no_grad():
        return torch.cat([embed(list(items[i:i + batch_size])).float().cpu()
                          for i in range(0, len(items), batch_size)])


class FeatureScorer:
    """Cosine similarity of features: subclasses give `_embed_images(batch)` and, for text, `_embed_texts(batch)`.

    batch_size: images (or prompts) per forward pass; the result does not depend on it.
    """

    name = "features"
    has_text = False

    def __init__(self, batch_size: int = 16):
        self.batch_size = batch_size

    def _embed_images(self, images: list) -> torch.Tensor:
        raise NotImplementedError

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        raise ScorerError(f"the {self.name} scorer has no text encoder: it scores images against images only")

    def image_features(self, images: Sequence) -> torch.Tensor:
        return in_batches(images, self.batch_size, self._embed_images)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        return in_batches(prompts, self.batch_size, self._embed_texts)

    def image_similarity(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        return cosine_matrix(self.image_features(generated), self.image_features(references))

    def text_similarity(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ScorerError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        if not self.has_text:
            self._embed_texts([])  # raises: this model has no text encoder
        image, text = self.image_features(images), self.text_features(prompts)
        return torch.nn.functional.cosine_similarity(image, text, dim=-1)
