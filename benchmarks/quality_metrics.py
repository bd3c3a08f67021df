"""The quality benchmark's evaluation protocol on the toy world: the prompts every adapter draws and the metrics
its images are scored with (the toy world's checker and subject score; every metric is a share or a mean of 0..1).
The benchmark itself (training, drawing, the command) is benchmarks/quality.py; the report quality_report.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

GEN_SEED = 1234  # generation seed of every evaluation image (the same for every run and the base model)


@dataclass(frozen=True)
class InstancePrompt:
    prompt: str
    position: str | None  # None: the prompt names no position (not scored)
    background: str | None  # None: the prompt names no background (not scored)


# --- prompts and metrics ---------------------------------------------------------------------------------


def instance_prompts(n: int) -> list[InstancePrompt]:
    """`n` prompts that put the subject in scenes none of its photos shows, in the world's caption grammar.

    Two of every three name a (position, background) pair that no photo has ("a photo of sks star on the left,
    on a gray background"); the third names only a background or only a position ("a photo of sks star, on a
    green background", "a photo of sks star at the top"). Backgrounds are those the subject stands out on.
    """
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT, PHOTOS, SUBJECT_BACKGROUNDS
    from moslora_diffusion.toy.world import POSITIONS

    seen = {(photo[0], photo[2]) for photo in PHOTOS}
    pairs = [(pos, bg) for bg, pos in itertools.product(SUBJECT_BACKGROUNDS, POSITIONS) if (pos, bg) not in seen]
    pairs = pairs[::2] + pairs[1::2]  # a short list still varies both
    partial = [x for pair in itertools.zip_longest([(None, bg) for bg in SUBJECT_BACKGROUNDS],
                                                   [(pos, None) for pos in POSITIONS]) for x in pair if x]
    chosen, full_i, partial_i = [], 0, 0
    for i in range(n):
        if i % 3 == 2:
            chosen.append(partial[partial_i % len(partial)])
            partial_i += 1
        else:
            chosen.append(pairs[full_i % len(pairs)])
            full_i += 1
    prompts = []
    for pos, bg in chosen:
        text = INSTANCE_PROMPT + (f" {POSITIONS[pos][1]}" if pos else "") + (f", on a {bg} background" if bg else "")
        prompts.append(InstancePrompt(text, pos, bg))
    return prompts


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def mean_pairwise_distance(images) -> float:
    """Mean absolute pixel difference (0..1) over all pairs of images."""
    x = _pixels(images).reshape(len(images), -1)
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean([np.abs(x[i] - x[j]).mean() for i, j in pairs])) if pairs else 0.0


def instance_metrics(images, prompts: list[InstancePrompt]) -> dict:
    """Subject fidelity and prompt fidelity (only the attributes a prompt names are scored)."""
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import THRESHOLD, subject_score

    readings = [check(im) for im in images]
    scores = [subject_score(im) for im in images]
    pairs = list(zip(readings, prompts, strict=True))
    bg_ok = [r.background == p.background for r, p in pairs if p.background]
    pos_ok = [r.position == p.position for r, p in pairs if p.position]
    both = [(p.background is None or r.background == p.background) and (p.position is None or r.position == p.position)
            for r, p in pairs]
    return {"subject_rate": float(np.mean([s >= THRESHOLD for s in scores])),
            "subject_score": float(np.mean(scores)),
            "prompt_background": float(np.mean(bg_ok)) if bg_ok else float("nan"),
            "prompt_position": float(np.mean(pos_ok)) if pos_ok else float("nan"),
            "prompt_fidelity": float(np.mean(both))}


def class_prompts(n: int) -> list[str]:
    """The class prompt as is, `n` times, then `n` class prompts with the scenes of the instance prompts ("a photo
    of a star on the left, on a gray background"): a subject that leaks into the class shows in either."""
    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT

    scenes = [p.prompt.replace(INSTANCE_PROMPT, CLASS_PROMPT) for p in instance_prompts(n)]
    return [CLASS_PROMPT] * n + scenes


def class_metrics(images, base_images) -> dict:
    """Prior preservation against the base model's same-prompt, same-seed images (all class prompts) and
    diversity (the plain class prompt's images: the first half, see `class_prompts`)."""
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import is_subject

    readings = [check(im) for im in images]
    base_readings = [check(im) for im in base_images]
    pairs = list(zip(readings, base_readings, strict=True))
    same = [(r.colour, r.background, r.position) == (b.colour, b.background, b.position) for r, b in pairs]
    pixel = np.abs(_pixels(images) - _pixels(base_images)).mean(axis=(1, 2, 3))
    plain, plain_readings = images[:len(images) // 2], readings[:len(images) // 2]
    return {"prior_agreement": float(np.mean(same)),
            "prior_background": float(np.mean([r.background == b.background for r, b in pairs])),
            "prior_pixel_distance": float(pixel.mean()),
            "prior_subject_leak": float(np.mean([is_subject(im) for im in images])),
            "diversity_pixel": mean_pairwise_distance(plain),
            "diversity_distinct": float(len({(r.colour, r.background) for r in plain_readings}) / len(plain))}


# name, what it is, which direction is better
METRICS = (
    ("subject_rate", "instance images (subject in unseen scenes) showing the subject (is_subject)", "higher"),
    ("subject_score", "mean subject_score of the instance images", "higher"),
    ("subject_rate_plain", "images of the bare instance prompt (the training caption) showing the subject",
     "higher"),
    ("prompt_fidelity", "instance images with every attribute their prompt names (background, position)", "higher"),
    ("prompt_background", "instance images with their prompt's background (prompts that name one)", "higher"),
    ("prompt_position", "instance images with their prompt's position (prompts that name one)", "higher"),
    ("prior_agreement", "class images read (colour, background, position) as the base model's image for the same "
     "prompt and seed", "higher"),
    ("prior_background", "class images with the background of the base model's same-prompt, same-seed image",
     "higher"),
    ("prior_pixel_distance", "mean |pixel difference| (0..1) of class images to the base model's same-prompt, "
     "same-seed image", "lower"),
    ("prior_subject_leak", "class images (plain and with scenes) that show the subject", "lower"),
    ("diversity_pixel", "mean pairwise |pixel difference| among the plain class prompt's images", "higher"),
    ("diversity_distinct", "distinct (colour, background) readings among the plain class prompt's images / images",
     "higher"),
)
