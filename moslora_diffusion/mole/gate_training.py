"""Training MoLE's gates (arXiv 2404.13628, section 3): the experts frozen, only the per-block gates learn.

The objective is the DreamBooth denoising loss on every expert's photos captioned with that expert's prompt
(optionally with prior preservation) plus the paper's gate-balancing loss, with real gradient:

    L = L_denoise + balance_weight * (-sum_i log q_i - N log N)

q_i: expert i's gate weight averaged over the gated blocks and the batch of the forward. N log N is the minimum
of -sum_i log q_i (q uniform); subtracting it changes no gradient and makes the logged term read 0 when the
experts are used evenly. The paper's CLIP-guided objective for its vision-language runs needs CLIP weights,
which an offline machine does not have; it is not offered here.

Everything else is the DreamBooth trainer's: the same flags, data pipeline, loop (NaN stop, Ctrl-C checkpoint),
atomic checkpoints, exact resume and trackers (training/), through GateTrainable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import check_masks, scan_photos
from ..files.atomic import atomic_write, check_not_an_input
from ..files.safetensors_io import read_keys, read_metadata
from ..formats.lora_files import family_hint, file_format, trigger_prompt
from ..training.model.components import load_base
from ..training.model.optim import check_packages, param_groups
from ..training.run_folder.checkpoints import CheckpointError, CheckpointInfo
from ..training.run_folder.manifest import record_written
from ..training.run_folder.outputs import CARD_FILE, check_output_dir, write_config
from ..training.run_folder.resume import find_resume
from ..training.settings.class_folder import check_class_folder_apart
from ..training.settings.config import ConfigError
from ..training.trainer.loop import TrainResult, make_accelerator, prepare_run, run_loop
from ..training.trainer.plan import prepare_class_images, training_resolution
from ..training.trainer.validation import run_validation
from .experts import MoLEError, as_mole_error, file_sha256, load_experts, photo_dir, resolve_expert_path
from .file import FILE_NAME, save_mole
from .gate_config import GateTrainConfig
from .losses import balance_loss
from .model import MoLE, attach_mole
from .report import save_gate_heatmap

HEATMAP_FILE = "gates.png"


@dataclass(frozen=True)
class ExpertSource:
    """Where an expert's training data is: checked before any model loads."""

    path: Path  # the resolved expert file
    photo_dir: str
    prompt: str


def expert_sources(config: GateTrainConfig) -> list[ExpertSource]:
    """Each expert's file, photo folder and prompt (given, or recorded by its training run); one-line
    MoLEError / ConfigError for a missing, pickle or non-LoRA file, experts of two families, or data that is
    neither given nor recorded. Reads file headers only."""
    sources, families = [], {}
    for i, given in enumerate(config.experts):
        path = resolve_expert_path(given)
        with as_mole_error():
            metadata, keys = read_metadata(path), read_keys(path)
            file_format(keys, str(path))
        family = family_hint(keys, metadata)
        if family:
            families.setdefault(family, given)
        if len(families) > 1:
            raise MoLEError(f"experts of different families: {', '.join(f'{g} is {f}' for f, g in families.items())};"
                            " all experts must be trained on one base model family")
        folder = config.expert_data_dirs[i] if config.expert_data_dirs else photo_dir(path, metadata)
        prompt = config.expert_prompts[i] if config.expert_prompts else trigger_prompt(metadata)
        if not folder:
            raise ConfigError(f"expert {given}: its photo folder is not recorded; pass --expert_data_dirs (one "
                              "folder per expert, in --experts order)")
        if not prompt:
            raise ConfigError(f"expert {given}: its trigger prompt is not recorded; pass --expert_prompts (one "
                              "prompt per expert, in --experts order)")
        if config.with_prior_preservation and config.class_data_dir:  # class images there would mix with its photos
            check_class_folder_apart(config.class_data_dir, folder, f"expert {given}'s photo folder")
        sources.append(ExpertSource(path, folder, prompt))
    # a run in an expert's folder (--overwrite_output_dir would clear it) must not touch the expert's files
    check_not_an_input(config.output_dir, list(config.experts) + [s.path for s in sources], "--output_dir")
    return sources


class GateTrainable:
    """The gates of an attached MoLE as what a training run trains (training/model/trainable.py's interface)."""

    def __init__(self, mole: MoLE, balance_weight: float):
        self.mole, self.balance_weight = mole, balance_weight
        self.params = list(mole.parameters())
        self.prepared_components: list[str] = []  # nothing in the pipeline trains: no DDP wrapper (see before_update)
        self.caches_prompts = not any(block.kind == "text" for block in mole.blocks)

    def param_groups(self, config) -> list[dict]:
        return param_groups(config, self.params, [])

    def identity(self) -> dict:
        ours = {"family": self.mole.family, "experts": [e.sha256 for e in self.mole.experts],
                "blocks": [b.name for b in self.mole.blocks]}
        return ours | ({"granularity": "position"} if self.mole.granularity == "position" else {})

    def check_checkpoint(self, info: CheckpointInfo) -> None:
        ours = self.identity()
        check_same_experts(info, ours["experts"])
        for key, what in (("family", "model family"), ("blocks", "gated blocks"), ("granularity", "gate granularity")):
            if info.state.get(key) != ours.get(key):
                raise CheckpointError(f"checkpoint {info.path} holds gates for another {what} than this run; "
                                      "resume on the same base model")

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"gates": self.mole.gate_state()}

    def load(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self.mole.load_gate_state(tensors["gates"])

    def extra_loss(self) -> torch.Tensor | None:
        """balance_weight * (L_balance - N log N) of the forward that just ran; its gates are then forgotten."""
        loss = None
        if self.balance_weight:
            n = int(self.mole.keep.sum())
            loss = self.balance_weight * (balance_loss(self.mole) - n * math.log(n))
        self.mole.clear_gates()
        return loss

    def before_update(self, accelerator) -> None:
        """The gates run inside hooks, not in a module DDP wraps: average their gradients over processes here."""
        if accelerator.num_processes > 1:
            for param in self.params:
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")


def check_same_experts(info: CheckpointInfo, hashes: list[str]) -> None:
    """CheckpointError unless the checkpoint's gates were trained for experts with these file hashes, in order."""
    if "experts" not in info.state:
        raise CheckpointError(f"checkpoint {info.path} holds DreamBooth adapters (train_dreambooth.py), not MoLE "
                              "gates: resume it with train_dreambooth.py")
    if info.state.get("experts") != hashes:
        raise CheckpointError(f"checkpoint {info.path} holds gates for other experts (by file hash) than this run; "
                              "resume with the same --experts, in the same order")


def train_gates(config: GateTrainConfig) -> TrainResult:
    """Trains the gates of `config.experts` and writes <output_dir>/mole.safetensors; see the module docstring.

    Raises ConfigError / MoLEError / DatasetError / OutputDirError / CheckpointError (one line) for bad input,
    before the model loads where the input allows; TrainingDiverged / TrainingInterrupted as the DreamBooth
    trainer does.
    """
    started = time.perf_counter()
    check_packages(config)  # --optimizer's and --report_to's, as the DreamBooth trainer checks them
    check_output_dir(config)
    sources = expert_sources(config)
    scans = [scan_photos(s.photo_dir, s.prompt) for s in sources]  # every file decided by content
    if config.masked_loss:
        check_masks([r for scan in scans for r in scan.records])
    accelerator = make_accelerator(config)
    resume = find_resume(config, accelerator.num_processes)
    if resume is not None:  # the experts by their files' hashes, before the model loads
        check_same_experts(resume, [file_sha256(s.path) for s in sources])
    base = load_base(config, accelerator.device)
    resolution = training_resolution(config, base)
    class_images = None
    if config.with_prior_preservation:  # before the experts are attached: the base model's own class images
        class_images = prepare_class_images(config, base, resolution, accelerator)
    mole = attach_mole(base.pipe, load_experts(base.pipe, [s.path for s in sources]),
                       granularity="position" if config.spatial_gates else "block")
    _train_mode(base, mole, config.gradient_checkpointing)
    trainable = GateTrainable(mole, config.balance_weight)
    if resume is not None:
        trainable.check_checkpoint(resume)
    run, batches = prepare_run(config, accelerator, base, trainable, scans, class_images, resolution,
                               "moslora-mole")
    losses, loop_seconds = run_loop(run, batches, resume)
    return finish(run, mole, sources, losses, started, loop_seconds)


def _train_mode(base, mole: MoLE, checkpointing: bool) -> None:
    """The gates in fp32 on the model's device; the frozen UNet (and the gated text encoders) in train mode."""
    mole.to(base.pipe.device, torch.float32)
    gated = [base.unet] + [e for e, name in zip(base.text_encoders, base.family.text_encoders, strict=True)
                           if any(b.kind == "text" and b.component == name for b in mole.blocks)]
    for module in gated:
        module.train()
        if checkpointing:
            if module is base.unet:
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def finish(run, mole: MoLE, sources: list[ExpertSource], losses: list[float], started: float,
           loop_seconds: float) -> TrainResult:
    """Final validation, mole.safetensors, the gate heat map of the experts' prompts, the config."""
    config, plan, acc = run.config, run.plan, run.accelerator
    acc.wait_for_everyone()
    run.posteriors.persist()
    result = TrainResult(Path(config.output_dir), plan.max_train_steps, run.start_step, losses,
                         loop_seconds=loop_seconds, vae_encoded=run.posteriors.encoded,
                         vae_reused=run.posteriors.reused)
    if acc.is_main_process:
        folder = Path(config.output_dir)
        if config.validation_prompt:
            run_validation(run.base.pipe, config, plan.resolution, plan.max_train_steps, acc)
        settings = {"balance_weight": config.balance_weight, "steps": plan.max_train_steps,
                    "learning_rate": config.learning_rate, "prompts": [s.prompt for s in sources]}
        record_written(folder, FILE_NAME, HEATMAP_FILE)
        result.files["mole"] = save_mole(mole, folder / FILE_NAME, config.pretrained_model_name_or_path, settings)
        result.files["gates"] = gate_heatmap(run, mole, [s.prompt for s in sources], folder / HEATMAP_FILE)
        result.seconds = time.perf_counter() - started
        summary = {"steps": result.steps, "resumed_from": result.resumed_from, "seconds": round(result.seconds, 1),
                   "final_loss": losses[-1] if losses else None}
        result.files["config"] = write_config(config, plan.to_dict(), summary)
        record_written(folder, CARD_FILE)
        card = model_card(config, mole, summary)
        result.files["card"] = atomic_write(folder / CARD_FILE, lambda p: p.write_text(card, encoding="utf-8"))
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
        print(f"\nGates trained: step {result.steps}{resumed}; {FILE_NAME} and {HEATMAP_FILE} in {folder}")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def model_card(config: GateTrainConfig, mole: MoLE, summary: dict) -> str:
    """README.md of the output folder: what was composed, how it was trained, how to use it."""
    experts = "\n".join(f"| {e.name} | `{e.trigger_prompt or ''}` | {e.source_format} | {e.rank} | {e.sha256[:12]} |"
                         for e in mole.experts)
    base = config.pretrained_model_name_or_path
    return f"""# MoLE: {', '.join(mole.expert_names)}

Mixture of LoRA Experts (arXiv 2404.13628) on `{base}` ({mole.family}): the experts below, frozen, weighted in
every block by a learned gate. Trained with moslora-diffusion for {summary['steps']} steps (learning rate
{config.learning_rate}, balance weight {config.balance_weight}); final loss {summary['final_loss']}.

| expert | trigger prompt | format | rank | sha256 |
|---|---|---|---:|---|
{experts}

![gate weights per block for the experts' prompts]({HEATMAP_FILE})

Generate with the learned gates (or mask experts, or scale them):

    python -m moslora_diffusion.mole generate --base {base} --mole {FILE_NAME} --prompt "..." --out samples

For AUTOMATIC1111 / ComfyUI, fold it into one standard LoRA (gates averaged per block over prompts):

    python -m moslora_diffusion.mole export --base {base} --mole {FILE_NAME} --to lora-kohya --out mole.safetensors
"""


@torch.no_grad()
def gate_heatmap(run, mole: MoLE, prompts: list[str], path: Path) -> Path:
    """Which expert each block chose for the experts' own prompts: one short generation, gates averaged."""
    mole.reset_report()
    generator = torch.Generator(run.accelerator.device).manual_seed(run.config.seed)
    size = run.plan.resolution
    run.base.pipe(prompts, num_inference_steps=4, height=size, width=size, generator=generator, output_type="latent")
    mole.clear_gates()
    return save_gate_heatmap(mole.gate_report(), mole.expert_names, path)
