"""The toy world's checker as a scorer (scorer.Scorer), so evaluation runs offline on assets/toy-base.

- Image feature: `shown` = min(1, subject_score / THRESHOLD) (toy/subject.py): 1 for an image that shows the
  striped subject, about 0 for an ordinary one-colour object. Shape (N, 1).
- Image-image similarity: 1 - |shown_i - shown_j|: 1 when both images agree on showing the subject (identical
  images score exactly 1), 0 when one shows it and the other does not.
- Image-text similarity: the share of the attributes the prompt names that the checker reads in the image:
  class word, object colour (a colour word before the class word), size word, position phrase,
  background colour ("on a green background") and, when the prompt holds the subject token (`sks`), `shown`.
  A prompt naming none of these scores 1 (nothing it asks for is missing).
The checker reads the toy world's 64 x 64 images only (toy/world.py RESOLUTION): `size_problem` says so before
any image is generated at another size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..toy.checker import check
from ..toy.subject import THRESHOLD, TOKEN, subject_score
from ..toy.subject_check import prompted_background
from ..toy.world import CLASSES, OBJECT_COLOURS, POSITIONS, RESOLUTION, SIZES
from .scorer import ScorerError, in_batches


def size_problem(size: int | None, flag: str) -> str | None:
    """Why images of `size` x `size` pixels (given with `flag`) cannot be scored by the toy checker, or None."""
    if size is None or int(size) == RESOLUTION:
        return None
    return (f"the toy scorer reads the toy world's {RESOLUTION}x{RESOLUTION} images, got {flag} {size}: use {flag} "
            f"{RESOLUTION} (the toy base's own size), or the dreambench metrics")


def shown(image) -> float:
    """0..1: how clearly the image shows the toy subject (1 at and above subject.THRESHOLD)."""
    return min(1.0, subject_score(image) / THRESHOLD)


def prompt_attributes(prompt: str, token: str = TOKEN) -> dict[str, str | bool]:
    """What a toy prompt asks for: {"cls", "colour", "size", "position", "background", "subject"}, named ones only."""
    words = prompt.lower().replace(",", " ").split()
    asked: dict[str, str | bool] = {}
    classes = [i for i, w in enumerate(words) if w in CLASSES]
    if classes:
        asked["cls"] = words[classes[0]]
        colours = [w for w in words[:classes[0]] if w in OBJECT_COLOURS]
        if colours:
            asked["colour"] = colours[-1]
    sizes = [w for w in words if w in SIZES]
    if sizes:
        asked["size"] = sizes[0]
    text = " ".join(words)
    for position, (_, phrase) in POSITIONS.items():
        if phrase in text:
            asked["position"] = position
    background = prompted_background(prompt)
    if background:
        asked["background"] = background
    if token in words:
        asked["subject"] = True
    return asked


def prompt_score(image, prompt: str, token: str = TOKEN) -> float:
    """Share (0..1) of the prompt's named attributes the checker reads in `image` (the subject: `shown`)."""
    asked = prompt_attributes(prompt, token)
    if not asked:
        return 1.0
    reading = check(image)
    scores = [shown(image) if name == "subject" else float(getattr(reading, name) == value)
              for name, value in asked.items()]
    return sum(scores) / len(scores)


class ToyScorer:
    """scorer.Scorer for the toy world; pure numpy on the CPU (batch_size only shapes the work, not the result)."""

    name = "toy"

    def __init__(self, batch_size: int = 16, token: str = TOKEN):
        self.batch_size = batch_size
        self.token = token

    def image_features(self, images: Sequence) -> torch.Tensor:
        return in_batches(images, self.batch_size, lambda batch: torch.tensor([[shown(im)] for im in batch]))

    def image_similarity(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        a, b = self.image_features(generated), self.image_features(references)
        return 1.0 - (a - b.T).abs()

    def text_similarity(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ScorerError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        pairs = list(zip(images, prompts, strict=True))
        return in_batches(pairs, self.batch_size, lambda batch: torch.tensor(
            [[prompt_score(im, p, self.token)] for im, p in batch]))[:, 0]
