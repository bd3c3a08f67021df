"""train(config): a DreamBooth run with MoSLoRA adapters, top to bottom.

1. check every input (config, optimizer package, output folder, photos, model, resume checkpoint)
   before anything is written;
2. frozen base in the weight dtype, fp32 adapters, class images, data, optimizer;
3. the loop: noise the latents, predict, MSE (+ prior loss), step; checkpoints and validation on the way;
4. final files: native adapter, folded diffusers / kohya LoRAs, model card, configuration.
"""

from __future__ import annotations

import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import scan_photos
from ..moslora.pipeline import set_pipeline_scale
from .batches import GlobalBatchStream
from .checkpoints import check_compatible, find_resume_checkpoint
from .components import (
    adapter_targets,
    attach_adapters,
    check_compile_toolchain,
    compile_unet,
    load_base,
    store_in_fp8,
)
from .config import TrainConfig
from .objective import diffusion_loss, draw, sample_latents, step_generator
from .optim import check_optimizer_available
from .outputs import append_progress, check_output_dir, prepare_output_dir, write_final_files
from .plan import build_dataset, data_report, make_plan, prepare_class_images, training_resolution
from .run import Run, restore, save, setup_run, start_batches
from .validation import run_validation


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # the global step reached
    resumed_from: int  # 0 for a fresh run
    losses: list[float] = field(default_factory=list)  # per optimizer step run here (mean over processes)
    seconds: float = 0.0  # the whole call, loading included
    loop_seconds: float = 0.0  # the training steps alone
    files: dict[str, Path] = field(default_factory=dict)
    vae_encoded: int = 0  # image rows this process ran through the VAE encoder
    vae_reused: int = 0  # rows answered without it (seen earlier in the run, or in the on-disk cache)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    project = ProjectConfiguration(project_dir=config.output_dir,
                                   logging_dir=str(Path(config.output_dir) / config.logging_dir))
    # SDXL reads its first text encoder at the penultimate layer: the last layer's adapters get no
    # gradient, which DDP only tolerates when told to look for unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.train_text_encoder)
    return Accelerator(mixed_precision=config.mixed_precision, project_config=project, kwargs_handlers=[ddp],
                       log_with=None if config.report_to == "none" else config.report_to)


def train(config: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    # Cheap checks first: a typo must not cost a model load, and nothing is written before all pass.
    check_optimizer_available(config.optimizer)
    check_output_dir(config)
    photos = scan_photos(config.instance_data_dir, config.instance_prompt)  # every file decided by content
    accelerator = make_accelerator(config)
    _warn_if_sharded(accelerator)
    check_compile_toolchain(config, accelerator.device)
    base = load_base(config, accelerator.device)
    trainable = attach_adapters(base, config)
    resume = find_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if resume is not None:
        check_compatible(resume, base.family.name, config.adapter_config.to_dict(), adapter_targets(base))
    elif config.resume_from_checkpoint and accelerator.is_main_process:
        print(f"No complete checkpoint in {config.output_dir} yet: starting from step 0.")
    resolution = training_resolution(config, base)

    class_images = None
    if config.with_prior_preservation:
        set_pipeline_scale(base.pipe, 0.0)  # adapters off: class images come from the base model exactly
        class_images = prepare_class_images(config, base, resolution, accelerator)
        set_pipeline_scale(base.pipe, 1.0)
    dataset = build_dataset(config, photos.records, class_images, resolution)
    if accelerator.is_main_process:
        print(data_report(config, photos, class_images, resolution))

    from diffusers import DDPMScheduler  # imported late: bad flags are reported without loading diffusers

    noise_scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    stream = GlobalBatchStream(dataset.bucket_ids, config.train_batch_size, accelerator.num_processes,
                               accelerator.process_index, config.seed)
    plan = make_plan(config, base, resolution, stream.batches_per_epoch, accelerator.num_processes,
                     noise_scheduler.config.num_train_timesteps)
    if accelerator.is_main_process:
        prepare_output_dir(config, plan.to_dict())
    accelerator.wait_for_everyone()
    accelerator.init_trackers("moslora-dreambooth", config=_hparams(config))

    run = setup_run(config, plan, accelerator, base, trainable, noise_scheduler)
    if config.fp8_base:  # after DDP's set-up, which broadcasts every weight: float8 is not a dtype it can send
        store_in_fp8(base.unet)
    if config.torch_compile:  # the module DDP wraps, compiled in place: compiled steps, DDP's hooks as before
        compile_unet(base.unet, config.dynamo_backend)
    if resume is not None:
        restore(run, resume)
    start_batches(run, dataset, stream)
    loop_started = time.perf_counter()
    losses = train_loop(run)
    return finish(run, losses, started, time.perf_counter() - loop_started)


def _warn_if_sharded(accelerator) -> None:
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        warnings.warn(f"{accelerator.distributed_type.name}: training runs, but checkpoints store the optimizer "
                      "state of process 0 only, so resuming is supported with DDP (multi-GPU) only; the adapters "
                      "are small enough that plain DDP is the recommended set-up", stacklevel=3)


def _hparams(config: TrainConfig) -> dict:
    # TensorBoard's hparams take numbers, strings and booleans only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def train_loop(run: Run) -> list[float]:
    config, plan, acc = run.config, run.plan, run.accelerator
    progress = tqdm(total=plan.max_train_steps, initial=run.start_step, desc="training", unit="step",
                    disable=not acc.is_main_process, dynamic_ncols=True)
    pending, losses = [], []
    for step in range(run.start_step + 1, plan.max_train_steps + 1):
        pending.append(optimizer_step(run, step))
        progress.update(1)
        if step % config.logging_steps == 0 or step == plan.max_train_steps:
            losses += log_losses(run, step, pending, progress)
            pending.clear()
        if step % config.checkpointing_steps == 0:
            save(run, step)
        if config.validation_prompt and step % config.validation_steps == 0 and step < plan.max_train_steps:
            if acc.is_main_process:
                run_validation(run.base.pipe, config, plan.resolution, step, acc, run.ema)
            acc.wait_for_everyone()
    progress.close()
    return losses


def log_losses(run: Run, step: int, pending: list[torch.Tensor], progress) -> list[float]:
    """Per-step losses of the interval ending at `step` (mean over processes), to the bar, trackers and file.

    The only host-device sync of the loop: once per logging interval, not per step.
    """
    acc = run.accelerator
    values = acc.reduce(torch.stack(pending), reduction="mean").tolist()
    interval_loss = sum(values) / len(values)
    acc.log({"loss": interval_loss, "lr": run.lr_scheduler.get_last_lr()[0]}, step=step)
    progress.set_postfix(loss=f"{interval_loss:.4f}")
    if acc.is_main_process:
        first = step - len(values) + 1
        append_progress(run.config.output_dir, [{"step": first + i, "total": run.plan.max_train_steps, "loss": v}
                                                for i, v in enumerate(values)])
    return values


def optimizer_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss (on device)."""
    config, acc = run.config, run.accelerator
    accumulation = config.gradient_accumulation_steps
    total = torch.zeros((), device=acc.device)
    for micro in range(accumulation):
        with ExitStack() as stack:
            if micro < accumulation - 1:  # no gradient all-reduce until the last micro-batch
                for model in run.models.values():
                    stack.enter_context(acc.no_sync(model))
            loss = micro_step_loss(run, next(run.batches), (step - 1) * accumulation + micro)
            acc.backward(loss / accumulation)
        total += loss.detach()
    if config.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, config.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    return total / accumulation


def micro_step_loss(run: Run, batch: dict, micro_step: int) -> torch.Tensor:
    """Noise the latents of `batch` at random timesteps, predict, and score the prediction."""
    config, base, device = run.config, run.base, run.accelerator.device
    if "latent_mean" in batch:  # --cache_latents
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = run.posteriors(batch["pixel_values"])
    generator = step_generator(config.seed, micro_step, device)
    draws = draw(run.layout, mean.shape[1:], generator, config.noise_offset, run.plan.timestep_range)
    latents = sample_latents(mean, std, draws.latent_eps, base.vae.config.scaling_factor,
                             getattr(base.vae.config, "shift_factor", None))
    noisy = run.noise_scheduler.add_noise(latents, draws.noise, draws.timesteps)
    if run.plan.prediction_type == "v_prediction":
        target = run.noise_scheduler.get_velocity(latents, draws.noise, draws.timesteps)
    else:
        target = draws.noise
    conditioning = run.conditioning.unet_kwargs(batch, base.weight_dtype)
    pred = run.models["unet"](noisy.to(base.weight_dtype), draws.timesteps, **conditioning, return_dict=False)[0]
    return diffusion_loss(pred, target, draws.timesteps, batch["num_instance"],
                          run.noise_scheduler.alphas_cumprod, run.plan.prediction_type, config.snr_gamma,
                          config.prior_loss_weight)


def finish(run: Run, losses: list[float], started: float, loop_seconds: float) -> TrainResult:
    """EMA weights in (they are what is saved), final validation, final files, summary."""
    config, plan, acc = run.config, run.plan, run.accelerator
    acc.wait_for_everyone()
    run.posteriors.persist()  # every process its own new entries, for the next run on these images
    if run.ema is not None:
        run.ema.copy_to_params()
    result = TrainResult(Path(config.output_dir), plan.max_train_steps, run.start_step, losses,
                         loop_seconds=loop_seconds, vae_encoded=run.posteriors.encoded,
                         vae_reused=run.posteriors.reused)
    if acc.is_main_process:
        images = []
        if config.validation_prompt:
            images = run_validation(run.base.pipe, config, plan.resolution, plan.max_train_steps, acc)
        result.seconds = time.perf_counter() - started
        summary = {"steps": result.steps, "resumed_from": result.resumed_from,
                   "seconds": round(result.seconds, 1), "final_loss": losses[-1] if losses else None}
        result.files = write_final_files(run.base.pipe, config, plan.to_dict(), summary, images)
        print_summary(result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def print_summary(result: TrainResult) -> None:
    ran = result.steps - result.resumed_from
    speed = ran / result.loop_seconds if result.loop_seconds else 0.0
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"\nTraining finished: step {result.steps} ({ran} steps in {result.loop_seconds:.0f} s, "
          f"{speed:.2f} steps/s{resumed}; {result.seconds:.0f} s in all).")
    if result.losses:
        print(f"Final loss: {result.losses[-1]:.4f}")
    if result.vae_encoded or result.vae_reused:
        print(f"VAE: {result.vae_encoded} image rows encoded, {result.vae_reused} reused (earlier in the run "
              "or from the latent cache of earlier runs).")
    print(f"Files in {result.output_dir}:")
    for path in result.files.values():
        print(f"  {Path(path).name}")
