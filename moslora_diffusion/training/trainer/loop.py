"""train(config): a DreamBooth run with MoSLoRA adapters, top to bottom.

1. check every input (config, optimizer package, output folder, photos, model, resume checkpoint)
   before anything is written;
2. frozen base in the weight dtype, fp32 adapters, class images, data, optimizer;
3. the loop: noise the latents, predict, MSE (+ prior loss), step; checkpoints and validation on the way;
   a NaN / inf loss or Ctrl-C ends it early without losing the last good state (stopping.py);
4. final files: native adapter, folded diffusers / kohya LoRAs, model card, configuration.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...data import PhotoScan, check_masks, scan_photos
from ...moslora.pipeline import set_pipeline_scale
from ..model.components import (
    BaseModel,
    attach_adapters,
    check_compile_toolchain,
    compile_unet,
    load_base,
    store_in_fp8,
)
from ..model.optim import check_packages
from ..model.trainable import AdapterTrainable, Trainable
from ..run_folder.checkpoints import CheckpointInfo, check_adapter_checkpoint
from ..run_folder.output_location import check_room
from ..run_folder.outputs import append_progress, check_output_dir, prepare_output_dir, write_final_files
from ..run_folder.resume import find_resume
from ..settings.config import TrainConfig, uses_class_images
from ..settings.trigger_word import check_word_in_captions
from ..step.batches import GlobalBatchStream
from ..step.objective import diffusion_loss, draw, sample_latents, step_generator
from .held_out import HeldOutLoss, log_held_out_loss, split_held_out
from .plan import build_dataset, data_report, make_plan, prepare_class_images, training_resolution
from .run import Run, restore, save, setup_run, start_batches
from .stopping import (
    CtrlC,
    StopRequested,
    TrainingDiverged,
    TrainingInterrupted,
    diverged_message,
    interrupted_message,
)
from .validation import run_validation
from .validation_scores import best_so_far


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
    check_packages(config)  # --optimizer's and --report_to's
    check_output_dir(config)
    photos = scan_photos(config.instance_data_dir, config.instance_prompt)  # every file decided by content
    photos, held_out = split_held_out(photos, config.validation_loss_photos)
    if config.masked_loss:
        check_masks(photos.records)
    check_word_in_captions(config, photos.records)
    accelerator = make_accelerator(config)
    _warn_if_sharded(accelerator)
    check_compile_toolchain(config, accelerator.device)
    resume = find_resume(config, accelerator.num_processes)  # other optimizer / batch settings: refused here
    if resume is not None:
        check_adapter_checkpoint(resume)
    base = load_base(config, accelerator.device)
    trained = attach_adapters(base, config)
    check_room(config, sum(p.numel() for params in trained.values() for p in params), len(photos.records),
               accelerator.num_processes, resume.step if resume else 0)  # now that the adapter's size is known
    trainable = AdapterTrainable(base, config, trained)
    if resume is not None:
        trainable.check_checkpoint(resume)
    resolution = training_resolution(config, base)

    class_images = None
    if uses_class_images(config):
        set_pipeline_scale(base.pipe, 0.0)  # adapters off: class images come from the base model exactly
        class_images = prepare_class_images(config, base, resolution, accelerator)
        set_pipeline_scale(base.pipe, 1.0)
    run, batches = prepare_run(config, accelerator, base, trainable, [photos], class_images, resolution,
                               "moslora-dreambooth")
    if held_out:
        run.held_out = HeldOutLoss(run, held_out)
        if accelerator.is_main_process:
            print(f"Held out for the validation loss: {', '.join(r.path.name for r in held_out)}")
    if config.fp8_base:  # after DDP's set-up, which broadcasts every weight: float8 is not a dtype it can send
        store_in_fp8(base.unet)
    if config.torch_compile:  # the module DDP wraps, compiled in place: compiled steps, DDP's hooks as before
        compile_unet(base.unet, config.dynamo_backend)
    losses, loop_seconds = run_loop(run, batches, resume)
    return finish(run, losses, started, loop_seconds)


def prepare_run(config: TrainConfig, accelerator, base: BaseModel, trainable: Trainable, scans: list[PhotoScan],
                class_images: list[Path] | None, resolution: int, project: str) -> tuple[Run, tuple]:
    """Dataset, noise schedule, batch order, plan, the output folder, trackers and the Run: what both trainers
    (DreamBooth here, MoLE's gates in mole/gate_training.py) share once the model and what trains are set up.
    scans: the photo folders trained on (one per MoLE expert). Returns the run and what run_loop needs to
    start its batches."""
    dataset = build_dataset(config, [r for scan in scans for r in scan.records], class_images, resolution)
    if accelerator.is_main_process:
        print(data_report(config, scans, class_images, resolution))

    from diffusers import DDPMScheduler  # imported late: bad flags are reported without loading diffusers

    noise_scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    stream = GlobalBatchStream(dataset.bucket_ids, config.train_batch_size, accelerator.num_processes,
                               accelerator.process_index, config.seed)
    plan = make_plan(config, base, resolution, stream.batches_per_epoch, accelerator.num_processes,
                     noise_scheduler.config.num_train_timesteps)
    if accelerator.is_main_process:
        prepare_output_dir(config, plan.to_dict())
    accelerator.wait_for_everyone()
    accelerator.init_trackers(project, config=_hparams(config))
    return setup_run(config, plan, accelerator, base, trainable, noise_scheduler), (dataset, stream)


def run_loop(run: Run, batches: tuple, resume: CheckpointInfo | None) -> tuple[list[float], float]:
    """Restores the checkpoint (if any), runs the loop; returns the losses and the loop's seconds."""
    if resume is not None:
        restore(run, resume)
        if run.accelerator.is_main_process:  # both trainers: the user sees which state the run continues from
            print(f"Resumed from {resume.path.name} in {resume.path.parent}: step {resume.step} of "
                  f"{run.plan.max_train_steps}.")
    elif run.config.resume_from_checkpoint and run.accelerator.is_main_process:
        print(f"No complete checkpoint in {run.config.output_dir} yet: starting from step 0.")
    start_batches(run, *batches)
    loop_started = time.perf_counter()
    try:
        losses = train_loop(run)
    except (TrainingDiverged, TrainingInterrupted):
        run.accelerator.end_training()  # trackers flushed and closed: the logged steps stay readable
        raise
    return losses, time.perf_counter() - loop_started


def _warn_if_sharded(accelerator) -> None:
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        warnings.warn(f"{accelerator.distributed_type.name}: training runs, but checkpoints store the optimizer "
                      "state of process 0 only, so resuming is supported with DDP (multi-GPU) only; the adapters "
                      "are small enough that plain DDP is the recommended set-up", stacklevel=3)


def _hparams(config: TrainConfig) -> dict:
    # TensorBoard's hparams take numbers, strings and booleans only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def train_loop(run: Run) -> list[float]:
    """The optimizer steps, with logging, checkpoints and validation on the way; returns the losses.

    Raises TrainingDiverged at the first NaN / inf loss or weight (nothing is saved from it on) and
    TrainingInterrupted after a Ctrl-C or SIGTERM, once the last finished step is checkpointed (stopping.py).
    """
    config, plan, acc = run.config, run.plan, run.accelerator
    progress = tqdm(total=plan.max_train_steps, initial=run.start_step, desc="training", unit="step",
                    disable=not acc.is_main_process, dynamic_ncols=True)
    pending, losses = [], []
    done = step = run.start_step  # the last finished step; the step being run
    # the last step a checkpoint in output_dir holds (a run resumed from another folder has none there yet)
    saved = run.start_step if (Path(config.output_dir) / f"checkpoint-{run.start_step}").is_dir() else 0
    with CtrlC(enabled=acc.num_processes == 1) as ctrl_c:
        try:
            for step in range(run.start_step + 1, plan.max_train_steps + 1):
                pending.append(optimizer_step(run, step, ctrl_c))
                done = step
                ctrl_c.end_update()
                progress.update(1)
                checkpoint = step % config.checkpointing_steps == 0
                if step % config.logging_steps == 0 or step == plan.max_train_steps or checkpoint:
                    losses += log_losses(run, step, pending, progress)  # every loss checked before a save
                    pending.clear()
                if checkpoint or step == plan.max_train_steps:
                    check_weights(run, step)
                if checkpoint:
                    save(run, step)
                    saved = step
                if step % config.validation_steps == 0 and step < plan.max_train_steps:
                    validate(run, step)
        except StopRequested:
            how = (f"the unfinished step {step} was discarded" if done < step else
                   "its optimizer update was finished first" if ctrl_c.update_finished_first else "")
            stop_after_ctrl_c(run, done, saved, pending, progress, how, ctrl_c.signum)
        finally:
            progress.close()  # before any message: the bar's last line must not follow it
    return losses


def validate(run: Run, step: int) -> None:
    """The held-out loss (every process: its modules may be DDP's) and the validation images (main process)."""
    config, acc = run.config, run.accelerator
    if run.held_out is not None:
        log_held_out_loss(run, step)
    if config.validation_prompt:
        if acc.is_main_process:
            run_validation(run.base.pipe, config, run.plan.resolution, step, acc, run.ema)
        acc.wait_for_everyone()


def stop_after_ctrl_c(run: Run, done: int, saved: int, pending: list[torch.Tensor], progress, how: str,
                      signum: int):
    """Logs the finished steps, saves checkpoint-<done> unless one holds it already, raises TrainingInterrupted.

    signum: the signal that stopped the run (Ctrl-C's SIGINT, or SIGTERM). Still under CtrlC: a second one
    raises KeyboardInterrupt out of here, leaving at most a checkpoint-<done>.tmp folder (never picked by `latest`).
    """
    if pending:
        log_losses(run, done, pending, progress)  # a non-finite loss ends in TrainingDiverged: nothing is saved
    progress.close()
    if done > 0 and saved != done:
        check_weights(run, done)
        save(run, done)
    raise TrainingInterrupted(interrupted_message(run.config.output_dir, done, run.plan.max_train_steps, how,
                                                  saved=done > 0, signum=signum), signum)


def check_weights(run: Run, step: int) -> None:
    """Raises TrainingDiverged unless every adapter weight (and EMA copy) is finite; one device sync."""
    tensors = run.params + (run.ema.shadow if run.ema is not None else [])
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise TrainingDiverged(diverged_message(run.config, step, "adapter weights became NaN or inf"))


def log_losses(run: Run, step: int, pending: list[torch.Tensor], progress) -> list[float]:
    """Per-step losses of the interval ending at `step` (mean over processes), to the bar, trackers and file.

    The only host-device sync of the loop: once per logging interval, not per step. Raises TrainingDiverged
    at the first non-finite loss (the finite ones before it are still recorded).
    """
    acc = run.accelerator
    values = acc.reduce(torch.stack(pending), reduction="mean").tolist()
    first = step - len(values) + 1
    bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
    finite = values if bad is None else values[:bad]
    if finite:
        interval_loss = sum(finite) / len(finite)
        acc.log({"loss": interval_loss, "lr": run.lr_scheduler.get_last_lr()[0]}, step=first + len(finite) - 1)
        progress.set_postfix(loss=f"{interval_loss:.4f}")
        if acc.is_main_process:
            append_progress(run.config.output_dir, [{"step": first + i, "total": run.plan.max_train_steps,
                                                     "loss": v} for i, v in enumerate(finite)])
    if bad is not None:
        raise TrainingDiverged(diverged_message(run.config, first + bad, f"loss became {values[bad]}"))
    return values


def optimizer_step(run: Run, step: int, ctrl_c: CtrlC | None = None) -> torch.Tensor:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss (on device).

    ctrl_c: a Ctrl-C during the micro-batches stops at once (only gradients exist yet); from the update on
    it waits until the caller calls ctrl_c.end_update().
    """
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
    if ctrl_c is not None:
        ctrl_c.begin_update()  # until the loop has recorded this step: a Ctrl-C now waits for the update's end
    run.trainable.before_update(acc)
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
    if run.preservation is not None:  # --prior_source base_model: class rows on these noisy latents
        batch, noisy, target, draws.timesteps = run.preservation.add_class_rows(batch, noisy, target, draws.timesteps)
    conditioning = run.conditioning.unet_kwargs(batch, base.weight_dtype)
    pred = run.models["unet"](noisy.to(base.weight_dtype), draws.timesteps, **conditioning, return_dict=False)[0]
    loss = diffusion_loss(pred, target, draws.timesteps, batch["num_instance"],
                          run.noise_scheduler.alphas_cumprod, run.plan.prediction_type, config.snr_gamma,
                          config.prior_loss_weight, batch.get("masks"))
    extra = run.trainable.extra_loss()  # MoLE: the gate-balancing loss of this forward's gates
    return loss if extra is None else loss + extra


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
    if run.held_out is not None:  # the saved (EMA) weights, on every process
        log_held_out_loss(run, plan.max_train_steps)
    if acc.is_main_process:
        images = []
        if config.validation_prompt:
            images = run_validation(run.base.pipe, config, plan.resolution, plan.max_train_steps, acc)
        result.seconds = time.perf_counter() - started
        summary = {"steps": result.steps, "resumed_from": result.resumed_from,
                   "seconds": round(result.seconds, 1), "final_loss": losses[-1] if losses else None}
        if config.keep_best:
            summary["best"] = best_so_far(config.output_dir)
        result.files = write_final_files(run.base.pipe, config, plan.to_dict(), summary, images)
        print_summary(result)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def final_loss_line(losses: list[float], window: int = 10) -> str:
    """The last step's loss and the mean of the last `window` steps: the progress bar shows an interval's mean, so
    a lone last-step value (one noise draw, one timestep) read as a different number with no explanation."""
    recent = losses[-window:]
    if len(recent) == 1:
        return f"Final loss: {losses[-1]:.4f}"
    return (f"Final loss: {losses[-1]:.4f} at the last step; mean of the last {len(recent)} steps "
            f"{sum(recent) / len(recent):.4f} (one step's loss varies with its random timestep and noise)")


def print_summary(result: TrainResult) -> None:
    ran = result.steps - result.resumed_from
    speed = ran / result.loop_seconds if result.loop_seconds else 0.0
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"\nTraining finished: step {result.steps} ({ran} steps in {result.loop_seconds:.0f} s, "
          f"{speed:.2f} steps/s{resumed}; {result.seconds:.0f} s in all).")
    if result.losses:
        print(final_loss_line(result.losses))
    if result.vae_encoded or result.vae_reused:
        print(f"VAE: {result.vae_encoded} image rows encoded, {result.vae_reused} reused (earlier in the run "
              "or from the latent cache of earlier runs).")
    print(f"Files in {result.output_dir}:")
    for path in result.files.values():
        print(f"  {Path(path).name}")
