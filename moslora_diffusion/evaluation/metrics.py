"""The measures of subject fidelity and prompt fidelity, per generated image, as the DreamBooth paper defines them.

DreamBooth (Ruiz et al., CVPR 2023, section 4.1), for the images generated for one subject:
- DINO: cosine similarity of DINO ViT-S/16 features (hf_scorers.DinoScorer) of a generated image and a real
  photo of the subject, averaged over ALL (generated, real) pairs.
- CLIP-I: the same with CLIP image features (hf_scorers.ClipScorer).
- CLIP-T: cosine similarity of a generated image's CLIP image feature and its prompt's CLIP text feature,
  averaged over the images. The prompt is written without the unique token, as CLIP has never seen it:
  "a sks dog in the jungle" is scored as "a dog in the jungle" (`clip_t_prompt`).
Here each image gets its own value (for DINO / CLIP-I its mean over the real photos), so the mean over images
equals the paper's mean over all pairs and confidence intervals can be taken over images.

On the toy world (`toy_metrics`): "toy_subject" (the toy scorer's image similarity to the subject photos) and
"toy_prompt" (the share of the prompt's attributes shown, the token included: the subject counts as an attribute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .scorer import Scorer


@dataclass(frozen=True)
class Metric:
    name: str  # the report's column: "dino", "clip_i", "clip_t", "toy_subject", "toy_prompt" (never a row field)
    scorer: Scorer
    kind: str  # "subject": generated vs every real photo; "prompt": generated vs its prompt
    drop_token: bool = False  # CLIP-T: the prompt without the unique token


def clip_t_prompt(prompt: str, token: str) -> str:
    """The prompt CLIP-T scores: the unique token's words removed ("a sks dog" -> "a dog")."""
    drop = set(token.split())
    return " ".join(word for word in prompt.split() if word not in drop)


def dreambench_metrics(dino: Scorer, clip: Scorer) -> list[Metric]:
    """DINO, CLIP-I and CLIP-T (the paper's three numbers)."""
    return [Metric("dino", dino, "subject"), Metric("clip_i", clip, "subject"),
            Metric("clip_t", clip, "prompt", drop_token=True)]


def toy_metrics(toy: Scorer) -> list[Metric]:
    return [Metric("toy_subject", toy, "subject"), Metric("toy_prompt", toy, "prompt")]


def score_images(metrics: Sequence[Metric], images: Sequence, references: Sequence, prompts: Sequence[str],
                 token: str) -> dict[str, list[float]]:
    """{metric name: one value per image}: subject metrics average each image's similarity over `references`
    (the real photos), prompt metrics compare image i with prompts[i] (without `token` where the metric says)."""
    scores = {}
    for metric in metrics:
        if metric.kind == "subject":
            values = metric.scorer.image_similarity(images, references).mean(dim=1)
        else:
            texts = [clip_t_prompt(p, token) if metric.drop_token else p for p in prompts]
            values = metric.scorer.text_similarity(images, texts)
        scores[metric.name] = [float(v) for v in torch.as_tensor(values)]
    return scores
