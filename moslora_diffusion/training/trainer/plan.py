"""What a run will do, resolved from the config and the model: data, class images, step counts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...data import DreamBoothDataset, ImageRecord, PhotoScan, ensure_class_images, make_buckets
from ...models.families import native_size
from ..model.components import BaseModel
from ..settings.config import ConfigError, TrainConfig, check_toy_resolution, preserves_base_output


@dataclass(frozen=True)
class RunPlan:
    """Settings that follow from the config plus the model and data (the config itself never changes)."""

    family: str
    prediction_type: str
    resolution: int
    num_processes: int
    global_batch: int  # images per micro-step over all processes
    effective_batch: int  # images per optimizer step (with gradient accumulation)
    batches_per_epoch: int  # global micro-batches per epoch
    max_train_steps: int
    timestep_range: tuple[int, int]  # [low, high) of the training timesteps

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(config: TrainConfig, base: BaseModel, resolution: int, batches_per_epoch: int,
              num_processes: int, num_train_timesteps: int) -> RunPlan:
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    high = config.max_timestep or num_train_timesteps
    if high > num_train_timesteps:
        raise ConfigError(f"--max_timestep {high} exceeds the scheduler's {num_train_timesteps} timesteps")
    global_batch = config.train_batch_size * num_processes
    return RunPlan(base.family.name, base.info.prediction_type, resolution, num_processes, global_batch,
                   global_batch * config.gradient_accumulation_steps, batches_per_epoch, max_steps,
                   (config.min_timestep, high))


def training_resolution(config: TrainConfig, base: BaseModel) -> int:
    """--resolution, else the size the base model was trained at (native_size: 512 / 768 / 1024 for real SD
    checkpoints, 64 for the embedded toy base, which was trained at 512 before: 64x the pixels and blurred
    photos); ConfigError when --validation_metrics toy cannot score that size (checked once the model is known,
    before any training step)."""
    pipe = getattr(base, "pipe", None)
    family_default = base.info.default_resolution
    resolution = config.resolution or (native_size(pipe, family_default) if pipe is not None else family_default)
    check_toy_resolution(config, resolution)
    return resolution


def prepare_class_images(config: TrainConfig, base: BaseModel, resolution: int, accelerator) -> list[Path]:
    """The class images, generating the missing ones with the base model (main process; resumable).

    Call before attaching adapters, so the images come from the untouched base model.
    """
    def generate(prompts: list[str], seeds: list[int]):
        generators = [torch.Generator(accelerator.device).manual_seed(s) for s in seeds]
        with accelerator.autocast():
            return base.pipe(prompts, num_inference_steps=config.class_inference_steps, height=resolution,
                             width=resolution, generator=generators).images

    with accelerator.main_process_first():
        progress = tqdm(desc="generating class images", disable=not accelerator.is_main_process, leave=False)

        def report(done: int, total: int) -> None:
            progress.total = total
            progress.n = done
            progress.refresh()

        paths = ensure_class_images(config.class_data_dir, config.class_prompt, config.num_class_images, generate,
                                    batch_size=config.sample_batch_size, seed=config.seed, progress=report)
        progress.close()
    return paths


def build_dataset(config: TrainConfig, records: list[ImageRecord], class_images: list[Path] | None,
                  resolution: int) -> DreamBoothDataset:
    return DreamBoothDataset(
        records, resolution, center_crop=config.center_crop, random_flip=config.random_flip,
        class_records=class_images, class_prompt=config.class_prompt if class_images else None,
        buckets=make_buckets(resolution) if config.enable_bucket else None, seed=config.seed,
        masked_loss=config.masked_loss, captions=config.caption_options)


def data_report(config: TrainConfig, scans: list[PhotoScan], class_images: list[Path] | None, resolution: int) -> str:
    """What the run trains on: photos used (per folder), files skipped and why, notes (downscaled, small), class
    images."""
    lines = [line for scan in scans for line in scan.report(resolution)]
    if class_images is not None:
        lines.append(f"Class images: {len(class_images)} used from {config.class_data_dir}")
    if preserves_base_output(config):
        ignored = f"; --class_data_dir {config.class_data_dir} ignored" if config.class_data_dir else ""
        lines.append(f"Prior preservation: the base model's own predictions for {config.class_prompt!r} on the same "
                     f"noisy latents as the photos (no class images{ignored})")
    return "\n".join(lines)
