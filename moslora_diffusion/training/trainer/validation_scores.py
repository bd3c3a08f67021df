"""--validation_metrics: scores of the validation images at every validation step, and --keep_best.

dreambench: DINO and CLIP-I of each validation image against the instance photos (mean over all pairs) and
CLIP-T against the validation prompt without the unique token (evaluation/metrics.py says exactly how);
toy: the toy checker's subject and prompt scores (evaluation/toy_scorer.py), offline on assets/toy-base.
A step's score for --keep_best is the mean of its metrics' means (each a cosine similarity or a share in
[-1, 1]); the best step's adapter is kept as moslora_best.safetensors, its step and scores in its metadata.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ...data import load_rgb, scan_photos
from ...evaluation.metrics import dreambench_metrics, score_images, toy_metrics
from ...files.safetensors_io import read_metadata
from ...moslora.native_file import METADATA_KEY, save_adapter
from ..run_folder.manifest import record_written
from ..run_folder.outputs import BEST_FILE


def unique_token(instance_prompt: str, class_prompt: str | None) -> str:
    """The instance prompt's words the class prompt lacks ("a photo of sks dog" vs "a photo of a dog": "sks");
    the last-but-one word when no class prompt is given (the DreamBooth "<token> <class>" habit)."""
    words = instance_prompt.split()
    if class_prompt:
        extra = [w for w in words if w not in class_prompt.split()]
        if extra:
            return " ".join(extra)
    return words[-2] if len(words) >= 2 else words[0]


@lru_cache(maxsize=2)
def _metrics(kind: str, dino: str, clip: str, device: str) -> tuple:
    """The scorers, loaded once per run (a run validates many times)."""
    if kind == "toy":
        from ...evaluation.toy_scorer import ToyScorer

        return tuple(toy_metrics(ToyScorer()))
    from ...evaluation.hf_scorers import ClipScorer, DinoScorer

    return tuple(dreambench_metrics(DinoScorer(dino, device), ClipScorer(clip, device)))


def score_validation(config, images: list, device: str) -> dict[str, float]:
    """{metric: mean over the validation images} for config.validation_metrics."""
    photos = [load_rgb(r.path) for r in scan_photos(config.instance_data_dir, config.instance_prompt).records]
    metrics = _metrics(config.validation_metrics, config.dino_model, config.clip_model, str(device))
    token = unique_token(config.instance_prompt, config.class_prompt)
    scores = score_images(metrics, images, photos, [config.validation_prompt] * len(images), token)
    return {name: sum(values) / len(values) for name, values in scores.items()}


def best_so_far(output_dir: str | Path) -> dict | None:
    """{"step", "scores", "score"} of the kept best adapter, or None."""
    path = Path(output_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(read_metadata(path)[METADATA_KEY]).get("best")
    except (KeyError, ValueError):
        return None


def keep_if_best(pipe, config, step: int, scores: dict[str, float]) -> bool:
    """Writes moslora_best.safetensors (atomically) when this step scores above the kept one; True if it did."""
    score = sum(scores.values()) / len(scores)
    best = best_so_far(config.output_dir)
    if best is not None and best["score"] >= score:
        return False
    record_written(config.output_dir, BEST_FILE)
    info = {"base_model": config.pretrained_model_name_or_path, "instance_prompt": config.instance_prompt,
            "steps": step, "best": {"step": step, "scores": scores, "score": score,
                                     "metrics": config.validation_metrics}}
    save_adapter(pipe, Path(config.output_dir) / BEST_FILE, info)
    return True
