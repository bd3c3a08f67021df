"""The quality benchmark's metrics on the toy world: what every adapter's images are scored with (the toy world's
checker and subject score; every metric is a share or a mean of 0..1). The prompts and their validation / test
split: quality_split.py; the benchmark itself (training, drawing, the command): quality.py; the report:
quality_report.py.
"""

from __future__ import annotations

import numpy as np

from benchmarks.quality_split import InstancePrompt


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


def class_metrics(images, base_images) -> dict:
    """Prior preservation against the base model's same-prompt, same-seed images (all class prompts) and
    diversity (the plain class prompt's images: the first half, see quality_split.class_prompts)."""
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
            "class_object_rate": float(np.mean([r.cls is not None for r in readings])),
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
    ("class_object_rate", "class images (plain and with scenes) that draw an object at all (a class prompt that "
     "draws an empty background has lost its class)", "higher"),
    ("diversity_pixel", "mean pairwise |pixel difference| among the plain class prompt's images", "higher"),
    ("diversity_distinct", "distinct (colour, background) readings among the plain class prompt's images / images",
     "higher"),
)
