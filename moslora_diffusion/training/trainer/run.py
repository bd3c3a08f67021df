"""Everything one training run holds once set up, and the two things done to it besides stepping:
saving a checkpoint and restoring one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data import DreamBoothDataset
from ..model.components import BaseModel
from ..model.conditioning import PromptConditioning
from ..model.ema import AdapterEMA
from ..model.optim import make_lr_scheduler, make_optimizer
from ..model.trainable import Trainable
from ..run_folder.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint_files,
    prune_checkpoints,
    save_checkpoint,
)
from ..run_folder.manifest import record_written
from ..run_folder.resume import resume_settings
from ..settings.config import TrainConfig, preserves_base_output, uses_class_images
from ..step.batches import GlobalBatchStream, LatentCache, pixel_batches
from ..step.objective import RowLayout
from ..step.output_preservation import OutputPreservation
from ..step.posterior_store import PosteriorStore, default_cache_dir
from ..step.posteriors import PosteriorMemo
from .plan import RunPlan


@dataclass
class Run:
    config: TrainConfig
    plan: RunPlan
    accelerator: object
    base: BaseModel
    models: dict  # component name -> the module to call (DDP-wrapped when distributed)
    trainable: Trainable  # what trains: DreamBooth's adapters or MoLE's gates
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object
    conditioning: PromptConditioning
    layout: RowLayout
    posteriors: PosteriorMemo  # VAE posteriors, each distinct image encoded once
    ema: AdapterEMA | None = None
    start_step: int = 0
    batches: Iterator[dict] | None = None  # set by start_batches
    # --validation_loss_photos: held_out.py's HeldOutLoss, built from a Run (so this module does not import it)
    held_out: object | None = None
    preservation: OutputPreservation | None = None  # --prior_source base_model


    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.trainable.params


def setup_run(config: TrainConfig, plan: RunPlan, accelerator, base: BaseModel, trainable: Trainable,
              noise_scheduler) -> Run:
    """Optimizer, schedule, device placement / DDP wrapping, EMA and prompt conditioning."""
    optimizer = make_optimizer(config, trainable.param_groups(config))
    # Not passed to accelerate.prepare: it would step the schedule once per process.
    lr_scheduler = make_lr_scheduler(config, optimizer, plan.max_train_steps)
    names = trainable.prepared_components
    # accelerate returns a bare object (not a 1-tuple) when handed one: the optimizer alone for MoLE's gates.
    *prepared, optimizer = accelerator.prepare(*[getattr(base.pipe, n) for n in names], optimizer) if names else (
        accelerator.prepare(optimizer),)
    models = {"unet": base.unet, **dict(zip(names, prepared, strict=True))}
    encoders = [models.get(name, getattr(base.pipe, name)) for name in base.family.text_encoders]
    conditioning = PromptConditioning(base.family, base.tokenizers, encoders, accelerator.device,
                                      # shuffled captions: a new prompt at most steps, not worth keeping
                                      cache=trainable.caches_prompts and not config.shuffle_caption)
    layout = RowLayout(config.train_batch_size, accelerator.num_processes, accelerator.process_index,
                       2 if uses_class_images(config) else 1)
    ema = AdapterEMA(trainable.params, config.ema_decay) if config.use_ema else None
    preservation = OutputPreservation(config, base, conditioning) if preserves_base_output(config) else None
    return Run(config, plan, accelerator, base, models, trainable, optimizer, lr_scheduler, noise_scheduler,
               conditioning, layout, posterior_memo(config, base, accelerator), ema, preservation=preservation)


def posterior_memo(config: TrainConfig, base: BaseModel, accelerator) -> PosteriorMemo:
    """The run's VAE posteriors, backed by the on-disk cache of earlier runs unless --no-latent_disk_cache."""
    store = None
    if config.latent_disk_cache:
        root = Path(config.latent_cache_dir).expanduser() if config.latent_cache_dir else default_cache_dir()
        store = PosteriorStore.for_vae(root, base.vae, accelerator.device, accelerator.process_index)
    return PosteriorMemo(base.vae, accelerator.device, store=store)


def start_batches(run: Run, dataset: DreamBoothDataset, stream: GlobalBatchStream) -> None:
    """Batches from the run's start step on; with --cache_latents, encodes every item first."""
    config = run.config
    stream.start = run.start_step * config.gradient_accumulation_steps
    with_prior = uses_class_images(config)
    if run.conditioning.cache:  # frozen text encoders, fixed captions: each prompt is encoded once
        captions = [r.caption for r in dataset.records] + ([""] if config.caption_dropout_rate else [])
        run.conditioning.precompute(captions + ([config.class_prompt] if with_prior else [])
                                    + (run.preservation.prompts(captions) if run.preservation else []))
        if not config.validation_prompt:  # the cached embeddings are all training needs
            for encoder in run.base.text_encoders:
                encoder.to("cpu")
    if config.cache_latents:
        cache = LatentCache(dataset, with_prior, run.posteriors)
        run.batches = cache.batches(stream)
    else:
        run.batches = pixel_batches(dataset, stream, with_prior, config.dataloader_num_workers)


def save(run: Run, step: int) -> None:
    """checkpoint-<step> (main process writes; every process waits so none runs ahead)."""
    acc = run.accelerator
    if acc.is_main_process:
        config = run.config
        state = {**run.trainable.identity(), "seed": config.seed,
                 "ema_updates": run.ema.num_updates if run.ema else None,
                 "settings": resume_settings(config, acc.num_processes)}
        tensors = run.trainable.tensors()
        if run.ema:
            tensors["ema"] = run.ema.tensors()
        objects = {"optimizer": run.optimizer.state_dict(), "scheduler": run.lr_scheduler.state_dict()}
        if acc.scaler is not None:
            objects["scaler"] = acc.scaler.state_dict()
        record_written(config.output_dir, f"checkpoint-{step}")
        save_checkpoint(config.output_dir, step, state, tensors, objects)
        prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
    acc.wait_for_everyone()


def restore(run: Run, info: CheckpointInfo) -> None:
    """Loads a checkpoint (already checked compatible) into the run; training continues after its step."""
    tensors, objects = load_checkpoint_files(info, run.accelerator.device)
    run.trainable.load(tensors)
    run.optimizer.load_state_dict(objects["optimizer"])
    run.lr_scheduler.load_state_dict(objects["scheduler"])
    resume_schedule(run.lr_scheduler, run.optimizer)
    if run.ema is not None:
        if "ema" not in tensors:
            raise CheckpointError(f"checkpoint {info.path} has no EMA weights, but this run uses --use_ema")
        run.ema.load_tensors(tensors["ema"], info.state["ema_updates"])
    if run.accelerator.scaler is not None and "scaler" in objects:
        run.accelerator.scaler.load_state_dict(objects["scaler"])
    run.start_step = info.step


def resume_schedule(lr_scheduler, optimizer) -> None:
    """The rate of the resumed step under this run's schedule: the optimizer state carries the rate the
    checkpoint's schedule set, and a changed --lr_scheduler, --lr_warmup_steps or --max_train_steps must apply
    from the first resumed step on. Unchanged settings give the same rate bit for bit (the same product).

    The diffusers schedules are LambdaLR: rate = base rate x lambda(step); the lambdas are this run's, the
    base rates and step the checkpoint's (equal to this run's, run_folder/resume.py checks).
    """
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for group, base, rate in zip(optimizer.param_groups, lr_scheduler.base_lrs, lambdas, strict=True):
        group["lr"] = base * rate(lr_scheduler.last_epoch)
