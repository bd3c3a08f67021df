"""Generates what is missing (resumable: an image whose file exists is never generated again) and scores every
image of a plan with the chosen metrics. Generation goes through generation/ (fused adapters at scale 1, the
same checked requests and `parameters` text as the app and the generate command); writes are atomic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ..files.atomic import save_image
from ..generation.fusion import FusedAdapters
from ..generation.text_to_image import GenerationRequest, generate
from .metrics import Metric, score_images
from .plan import Job, Subject, jobs


@dataclass(frozen=True)
class Sampling:
    """How every image is drawn (checked by generation.validate_request before the model loads)."""

    steps: int = 25
    guidance: float = 7.5
    size: int = 512
    sampler: str = "DPM++ 2M"
    negative_prompt: str = ""

    def request(self, prompt: str, seed: int, scales: dict[str, float]) -> GenerationRequest:
        return GenerationRequest(prompt, self.negative_prompt, seed, self.steps, self.guidance, self.size, self.size,
                                 1, self.sampler, scales)


def missing_jobs(subjects: list[Subject], seeds: list[int], images_dir: Path) -> list[Job]:
    return [job for job in jobs(subjects, seeds) if not job.path(images_dir).is_file()]


def generate_missing(pipe, subjects: list[Subject], seeds: list[int], images_dir: Path, sampling: Sampling,
                     model_name: str) -> int:
    """Generates every image of the plan whose file is missing; returns how many were generated.

    Each adapter is fused at scale 1 for its own images only (None: the base model, every scale 0)."""
    todo = missing_jobs(subjects, seeds, images_dir)
    if not todo:
        return 0
    fusion = FusedAdapters(pipe)
    by_subject = {s.name: s for s in subjects}
    bar = tqdm(total=len(todo), desc="generating", unit="image", dynamic_ncols=True)
    loaded = None
    try:
        for job in todo:
            if loaded != (job.subject, job.adapter):
                if loaded is not None and loaded[1] in fusion.names():
                    fusion.remove(loaded[1])
                path = by_subject[job.subject].adapters[job.adapter]
                if path is not None:
                    fusion.add(job.adapter, path, 1.0)
                loaded = (job.subject, job.adapter)
            _generate_one(pipe, fusion, job, images_dir, sampling, model_name)
            bar.update(1)
    finally:
        bar.close()
        for name in fusion.names():  # the caller's pipeline gets its base weights back
            fusion.remove(name)
    return len(todo)


def _generate_one(pipe, fusion: FusedAdapters, job: Job, images_dir: Path, sampling: Sampling, model: str) -> None:
    scales = dict.fromkeys(fusion.names(), 1.0)
    item = generate(pipe, fusion, sampling.request(job.prompt, job.seed, scales), model)[0]
    meta = PngInfo()
    meta.add_text("parameters", item.infotext)
    save_image(item.image, job.path(images_dir), "PNG", pnginfo=meta)  # makes the folders once there is room


def score_plan(subjects: list[Subject], seeds: list[int], images_dir: Path, metrics: list[Metric],
               token: str) -> list[dict]:
    """One row per image: adapter, subject, class, prompt, seed, path (relative to images_dir) and each metric.

    Every image of one (subject, adapter) is scored in one batched call against the subject's real photos."""
    rows = []
    groups = [(s, label) for s in subjects for label in s.adapters]
    for subject, label in tqdm(groups, desc="scoring", unit="adapter x subject", dynamic_ncols=True):
        references = subject.real_images()
        batch = [Job(label, subject.name, prompt, seed) for prompt in subject.prompts for seed in seeds]
        images = []
        for job in batch:
            with Image.open(job.path(images_dir)) as image:
                images.append(image.convert("RGB"))
        scores = score_images(metrics, images, references, [job.prompt for job in batch], token)
        for i, job in enumerate(batch):
            rows.append({"adapter": label, "subject": subject.name, "class": subject.cls, "prompt": job.prompt,
                         "seed": job.seed, "path": job.path(images_dir).relative_to(images_dir).as_posix(),
                         **{name: values[i] for name, values in scores.items()}})
    return rows
