"""The training configuration: one frozen dataclass, validated on construction, and its command line.

Every field is a flag of the same name (`--learning_rate`, ...), named as in diffusers'
train_dreambooth_lora(_sdxl).py where those scripts have the setting; flags.py turns the fields into the
command line and reads `--config run.yaml` (or .toml). The parsed values are turned into a TrainConfig
once and never changed afterwards: settings that depend on the model (the default resolution, the number
of steps) are resolved into a separate RunPlan by the trainer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from ...checks import MAX_SEED, Range, number_problems
from ...data.captions import CaptionOptions
from ...evaluation.toy_scorer import size_problem
from ...generation.text_to_image import MAX_STEPS as MAX_INFERENCE_STEPS
from ...moslora.inject import UNET_TARGET_PRESETS, AdapterConfig, resolve_targets
from ...moslora.layer import KINDS, MIXER_INITS
from .class_folder import check_class_folder
from .flags import (
    ConfigError,
    check_choices,
    check_not_empty,
    check_types,
    default_output_note,
    flag_values,
    from_file_note,
)
from .flags import build_parser as flags_parser
from .flags import flag as _flag
from .notes import unused_flag_notes
from .presets import load_preset, preset_names, preset_path
from .trigger_word import check_pivotal_flags

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# The learning rate an optimizer takes when none is given: 1e-4 for AdamW (diffusers' DreamBooth LoRA recipe);
# Prodigy estimates its own step size and lr is a multiplier on it, 1.0 as its authors recommend.
OPTIMIZER_LEARNING_RATES = {"adamw": 1e-4, "adamw8bit": 1e-4, "prodigy": 1.0}
# torch.compile backends worth offering: inductor generates fused kernels; aot_eager only traces (for debugging).
DYNAMO_BACKENDS = ("inductor", "aot_eager")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")  # wandb: through accelerate's tracker, when installed
VALIDATION_METRICS = ("none", "dreambench", "toy")
PRIOR_SOURCES = ("auto", "class_images", "base_model")  # base_model: training/step/output_preservation.py
# diffusers.optimization.SchedulerType values (kept here so `--help` needs no diffusers import), except
# piecewise_constant, which needs step rules that no flag gives.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

# Settings that steer a run without defining what it learns: they may differ when a run is resumed in
# the same output folder (e.g. more steps, another checkpoint interval). output_dir is where the run lives,
# not what it is: a run folder that was moved or renamed still resumes.
RUN_CONTROL_FIELDS = frozenset({
    "output_dir", "preset",
    "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "num_train_epochs", "checkpointing_steps",
    "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_steps",
    "validation_inference_steps", "report_to", "logging_dir", "logging_steps", "dataloader_num_workers",
    "gradient_checkpointing", "sample_batch_size", "latent_disk_cache", "latent_cache_dir",
    "channels_last", "torch_compile", "dynamo_backend", "validation_metrics", "dino_model", "clip_model", "keep_best",
})

PROG = "train_dreambooth.py"
DESCRIPTION = "DreamBooth fine-tuning of Stable Diffusion with MoSLoRA adapters."


@dataclass(frozen=True)
class TrainConfig:
    preset: str | None = _flag(None, "start from a preset's settings (a TOML file in moslora_diffusion/training/"
                               "presets/; flags given here and --config win over it)", tuple(preset_names()), "preset")
    # model
    pretrained_model_name_or_path: str | None = _flag(
        None, "hub id, local diffusers folder or single .safetensors checkpoint (required)", group="model")
    revision: str | None = _flag(None, "hub revision of the model", group="model")
    variant: str | None = _flag(None, "weight variant to load, e.g. fp16", group="model")
    pretrained_vae_model_name_or_path: str | None = _flag(
        None, "a separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix)", group="model")
    single_file_config: str | None = _flag(
        None, "diffusers folder or hub id with the configs of a single-file checkpoint (needed offline)",
        group="model")
    # data
    instance_data_dir: str | None = _flag(None, "folder with the subject's photos (required)", group="data")
    instance_prompt: str | None = _flag(None, "prompt with the trigger word, e.g. 'a photo of sks dog' (required)",
                                        group="data")
    resolution: int | None = _flag(None, "training resolution in pixels (default: the model family's)", group="data")
    center_crop: bool = _flag(False, "crop the centre instead of a random crop", group="data")
    random_flip: bool = _flag(False, "flip images horizontally at random", group="data")
    enable_bucket: bool = _flag(False, "aspect-ratio buckets instead of square crops", group="data")
    dataloader_num_workers: int = _flag(0, "data loading worker processes", group="data")
    masked_loss: bool = _flag(False, "train only on the subject: a <name>_mask.png beside each photo (white = subject) "
                              "or the photo's alpha channel weights the loss", group="data")
    caption_dropout_rate: float = _flag(0.0, "probability that an instance caption is replaced by '' (0..1)",
                                        group="data")
    shuffle_caption: bool = _flag(False, "shuffle the comma-separated parts of instance captions", group="data")
    keep_tokens: int = _flag(0, "with --shuffle_caption: the first N parts stay in place", group="data")
    # prior preservation
    with_prior_preservation: bool = _flag(False, "add the class prior-preservation loss", group="prior preservation")
    class_data_dir: str | None = _flag(None, "folder of class images; missing ones are generated",
                                       group="prior preservation")
    class_prompt: str | None = _flag(None, "prompt of the class, e.g. 'a photo of a dog'", group="prior preservation")
    prior_source: str = _flag("auto", "targets of the prior loss: class_images (--class_data_dir, missing ones "
                              "generated) or base_model (the base model's own prediction for the class prompt on the "
                              "same noisy latents, no class images; it measured better on the toy world); auto: "
                              "class_images when --class_data_dir is given, else base_model", PRIOR_SOURCES,
                              "prior preservation")
    num_class_images: int = _flag(100, "class images to use (generated with the base model if fewer exist)",
                                  group="prior preservation")
    prior_loss_weight: float = _flag(1.0, "weight of the prior-preservation loss", group="prior preservation")
    sample_batch_size: int = _flag(4, "batch size for generating class images", group="prior preservation")
    class_inference_steps: int = _flag(30, "denoising steps per generated class image", group="prior preservation")
    # adapter
    adapter: str = _flag("moslora", "adapter kind: moslora (with the r x r mixer) or plain lora", KINDS, "adapter")
    rank: int = _flag(4, "adapter rank r", group="adapter")
    lora_alpha: float | None = _flag(None, "adapter alpha (default: the rank, i.e. scale 1)", group="adapter")
    mixer_init: str = _flag("kaiming", "initialisation of the mixer M", MIXER_INITS, "adapter")
    target_modules: str = _flag("attn", f"UNet preset {sorted(UNET_TARGET_PRESETS)} or a comma-separated list of "
                                "module names", group="adapter")
    train_text_encoder: bool = _flag(False, "also adapt the text encoder(s) (both on SDXL)", group="adapter")
    text_encoder_lr: float | None = _flag(None, "learning rate of the text encoder adapters (default: "
                                          "--learning_rate)", group="adapter")
    train_text_encoder_ti: bool = _flag(False, "pivotal tuning: also learn new vectors for --token_abstraction's "
                                        "token(s) in the text encoder(s) (textual inversion + LoRA)", group="adapter")
    token_abstraction: str | None = _flag(None, "the trigger word whose embedding --train_text_encoder_ti learns, "
                                          "e.g. sks (must appear in --instance_prompt)", group="adapter")
    embedding_lr: float | None = _flag(None, "learning rate of the trigger word's vectors (default: --learning_rate)",
                                       group="adapter")
    # optimisation
    learning_rate: float | None = _flag(None, "learning rate of the UNet adapters (default: the optimizer's: "
                                        "1e-4 for adamw and adamw8bit, 1.0 for prodigy)")
    lr_scheduler: str = _flag("constant", "learning-rate schedule", LR_SCHEDULERS)
    lr_warmup_steps: int = _flag(0, "warm-up steps of the schedule")
    max_train_steps: int | None = _flag(None, "optimizer steps to train (overrides --num_train_epochs)")
    num_train_epochs: int = _flag(1, "epochs to train when --max_train_steps is not given")
    train_batch_size: int = _flag(1, "batch size per device")
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm (0 disables clipping)")
    optimizer: str = _flag("adamw", "optimizer (adamw8bit needs bitsandbytes, prodigy needs prodigyopt)", OPTIMIZERS)
    adam_beta1: float = _flag(0.9, "Adam beta1")
    adam_beta2: float = _flag(0.999, "Adam beta2")
    adam_weight_decay: float = _flag(1e-2, "Adam weight decay")
    adam_epsilon: float = _flag(1e-8, "Adam epsilon")
    snr_gamma: float | None = _flag(None, "Min-SNR loss weighting gamma (5.0 is the paper's value)")
    noise_offset: float = _flag(0.0, "noise offset (e.g. 0.05) for darker darks and brighter brights")
    min_timestep: int = _flag(0, "smallest diffusion timestep to train on")
    max_timestep: int | None = _flag(None, "largest diffusion timestep + 1 (default: the scheduler's number)")
    mixed_precision: str = _flag("no", "dtype of the frozen base model; adapters always stay fp32", MIXED_PRECISIONS)
    gradient_checkpointing: bool = _flag(False, "trade compute for memory")
    fp8_base: bool = _flag(False, "keep the frozen UNet's linear and convolution weights in float8 (e4m3), upcast per "
                           "operation: half the UNet's memory (kohya's --fp8_base; needs --mixed_precision bf16 or "
                           "fp16, and saves most with --gradient_checkpointing)")
    channels_last: bool | None = _flag(None, "UNet in channels-last memory format (default: on for CUDA, where it "
                                       "measured 5-30% faster steps; off on CPU, where it is slower)")
    torch_compile: bool = _flag(False, "compile the UNet with torch.compile (kohya's --torch_compile): fused kernels, "
                                "after a compile of a minute or more at the first step")
    dynamo_backend: str = _flag("inductor", "torch.compile backend for --torch_compile", DYNAMO_BACKENDS)
    cache_latents: bool = _flag(False, "encode every image with the VAE once (freezes the crop/flip drawn first)")
    latent_disk_cache: bool = _flag(True, "keep each image's VAE posterior on disk: a later run on the same images "
                                    "and VAE skips the encoder (--no-latent_disk_cache: off)")
    latent_cache_dir: str | None = _flag(None, "folder of that cache (default: $MOSLORA_CACHE_DIR/latents, else "
                                         "~/.cache/moslora-diffusion/latents)")
    seed: int = _flag(0, "seed of everything random: same seed, same run")
    use_ema: bool = _flag(False, "keep an EMA of the adapter weights; the EMA weights are saved")
    ema_decay: float = _flag(0.995, "EMA decay")
    # validation
    validation_prompt: str | None = _flag(None, "prompt for validation images", group="validation")
    num_validation_images: int = _flag(4, "images per validation", group="validation")
    validation_steps: int = _flag(100, "validate every N steps", group="validation")
    validation_inference_steps: int = _flag(25, "denoising steps per validation image", group="validation")
    validation_metrics: str = _flag(
        "none", "score every validation: dreambench (DINO, CLIP-I to the instance photos, CLIP-T) or toy (the toy "
        "checker, offline on assets/toy-base)", VALIDATION_METRICS, "validation")
    dino_model: str = _flag("facebook/dino-vits16", "DINO model for --validation_metrics dreambench (safetensors)",
                            group="validation")
    clip_model: str = _flag("openai/clip-vit-base-patch32", "CLIP model for --validation_metrics dreambench",
                            group="validation")
    keep_best: bool = _flag(False, "keep the adapter of the best-scoring validation as moslora_best.safetensors",
                            group="validation")
    validation_loss_photos: int = _flag(
        0, "set N instance photos aside (never trained on) and score the diffusion loss on them at fixed noise and "
        "timesteps every --validation_steps steps: val_loss in progress.jsonl and the trackers", group="validation")
    # checkpoints and outputs
    checkpointing_steps: int = _flag(500, "save a resumable checkpoint every N steps", group="output")
    checkpoints_total_limit: int | None = _flag(None, "keep only the newest N checkpoints", group="output")
    resume_from_checkpoint: str | None = _flag(None, "'latest' or a checkpoint folder", group="output")
    output_dir: str = _flag("moslora-dreambooth-model", "where the trained adapter goes", group="output")
    overwrite_output_dir: bool = _flag(False, "replace a different run's files in --output_dir", group="output")
    logging_dir: str = _flag("logs", "TensorBoard folder, relative to --output_dir", group="output")
    report_to: str = _flag("tensorboard", "where to log metrics and validation images", REPORT_TO, "output")
    logging_steps: int = _flag(10, "log the loss every N steps (reading it back costs a device sync)",
                               group="output")

    def __post_init__(self):
        check_types(self)
        if self.learning_rate is None:  # the optimizer's own default (OPTIMIZER_LEARNING_RATES)
            object.__setattr__(self, "learning_rate", OPTIMIZER_LEARNING_RATES.get(self.optimizer, 1e-4))
        self.check_required()
        check_not_empty(self)
        self.check_ranges()
        check_choices(self)
        _check_flag_pairs(self)
        _check_class_folder(self)
        check_pivotal_flags(self)  # after the ranges: `--embedding_lr nan` is reported as not finite
        resolve_targets(self.target_modules, UNET_TARGET_PRESETS)  # raises on an empty list

    def check_required(self) -> None:
        _check_required(self)

    def check_ranges(self) -> None:
        check_number_ranges(self, NUMBER_RANGES)

    @property
    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(kind=self.adapter, rank=self.rank, alpha=self.lora_alpha, mixer_init=self.mixer_init)

    @property
    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(self.caption_dropout_rate, self.shuffle_caption, self.keep_tokens)

    @property
    def resolved_prior_source(self) -> str:
        """class_images or base_model: what --prior_source auto (the default) stands for in this run."""
        if self.prior_source != "auto":
            return self.prior_source
        return "class_images" if self.class_data_dir else "base_model"

    @property
    def unet_targets(self) -> tuple[str, ...]:
        return resolve_targets(self.target_modules, UNET_TARGET_PRESETS)

    def to_dict(self) -> dict:
        return asdict(self)

    def run_defining(self) -> dict:
        """The settings that decide what is learned (a resumed run must agree on all of them)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_FIELDS}


def _check_required(c: TrainConfig) -> None:
    if not c.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required (hub id, diffusers folder or .safetensors)")
    if not c.instance_data_dir:
        raise ConfigError("--instance_data_dir is required (the folder with the subject's photos)")
    if not (c.instance_prompt or "").strip():
        raise ConfigError("--instance_prompt is required, e.g. --instance_prompt 'a photo of sks dog'")
    if c.with_prior_preservation:
        if not (c.class_prompt or "").strip():
            raise ConfigError("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'")
        if not c.class_data_dir and c.prior_source == "class_images":
            raise ConfigError("--with_prior_preservation needs --class_data_dir (missing images are generated "
                              "there), or --prior_source base_model (no class images)")


def _check_flag_pairs(c: TrainConfig) -> None:
    """Flags that act only with another one: training silently without what the user asked for costs a whole run."""
    if not c.with_prior_preservation and c.prior_source == "base_model":
        raise ConfigError(f"--prior_source {c.prior_source} applies to prior preservation only: add "
                          "--with_prior_preservation (and --class_prompt), or drop it")
    if c.keep_tokens and not c.shuffle_caption:
        raise ConfigError("--keep_tokens keeps caption parts in place when --shuffle_caption shuffles the others: add "
                          "--shuffle_caption, or drop it")


def _check_class_folder(c: TrainConfig) -> None:
    if uses_class_images(c) and c.class_data_dir:  # else the folder is not used (parse_args says so in a note)
        check_class_folder(c.class_data_dir, c.instance_data_dir)


# Far beyond any DreamBooth or gate run (a few thousand steps), so a typo of many digits is caught before loading.
MAX_STEPS = 10_000_000
_GT0, _GE0, _UNIT = Range(0, open_lower=True), Range(0), Range(0, 1, open_upper=True)
_GT0_OR_NONE = replace(_GT0, optional=True)
# 4x SDXL's 1024 px (16x its pixels): past any model's training size, and a typo of many digits (`--resolution
# 1000000`) would otherwise start and be killed for memory a minute later.
MAX_RESOLUTION = 4096
# Denoising steps of a validation or class image: generate's --steps limit (1..150). More than the scheduler's
# train timesteps (1000) failed inside diffusers only after training, losing the trained steps.
_INFERENCE_STEPS = Range(1, MAX_INFERENCE_STEPS)
# A validation renders its images as one batch: 64 is 8x the app's cap per request (1..8) and more than anyone
# looks at, while a typo of many digits (100000) ran out of memory after training, losing the run.
MAX_VALIDATION_IMAGES = 64
# diffusers' DreamBooth default is 100 and recipes use a few hundred: 10,000 is far past any, and a typo of many
# digits would otherwise spend days generating class images (100000000 showed an ETA of 29,000 hours).
MAX_CLASS_IMAGES = 10_000
# Every number a run takes, with where it may lie (finite always: `--learning_rate inf` never trains).
# tests/test_checks.py checks that no int or float setting is missing here.
NUMBER_RANGES = {
    "resolution": Range(8, MAX_RESOLUTION, multiple_of=8, optional=True),  # the VAE downsamples by 8
    "dataloader_num_workers": _GE0, "num_class_images": Range(1, MAX_CLASS_IMAGES), "prior_loss_weight": _GE0,
    "sample_batch_size": _GT0, "class_inference_steps": _INFERENCE_STEPS, "rank": _GT0, "lora_alpha": _GT0_OR_NONE,
    "text_encoder_lr": _GT0_OR_NONE, "embedding_lr": _GT0_OR_NONE,
    "learning_rate": _GT0, "lr_warmup_steps": _GE0, "max_train_steps": replace(_GT0_OR_NONE, upper=MAX_STEPS),
    "num_train_epochs": replace(_GT0, upper=MAX_STEPS),
    "train_batch_size": _GT0, "gradient_accumulation_steps": _GT0, "max_grad_norm": _GE0, "adam_beta1": _UNIT,
    "adam_beta2": _UNIT, "adam_weight_decay": _GE0, "adam_epsilon": _GT0, "snr_gamma": _GT0_OR_NONE,
    "noise_offset": _GE0, "min_timestep": _GE0, "max_timestep": _GT0_OR_NONE, "seed": Range(0, MAX_SEED),
    "ema_decay": _UNIT, "num_validation_images": Range(1, MAX_VALIDATION_IMAGES), "validation_steps": _GT0,
    "validation_loss_photos": _GE0, "validation_inference_steps": _INFERENCE_STEPS,
    "checkpointing_steps": _GT0, "checkpoints_total_limit": _GT0_OR_NONE, "logging_steps": _GT0,
    "caption_dropout_rate": Range(0, 1), "keep_tokens": replace(_GE0, integer=True),
}


def check_number_ranges(c: TrainConfig, ranges: dict[str, Range]) -> None:
    problems = number_problems({name: getattr(c, name) for name in ranges}, ranges, "--{}")
    if problems:
        raise ConfigError("; ".join(problems))
    if c.overwrite_output_dir and c.resume_from_checkpoint:
        raise ConfigError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would resume "
                          "from; pass one of them")
    if c.fp8_base and c.mixed_precision == "no":
        raise ConfigError("--fp8_base needs --mixed_precision bf16 or fp16: autocast is what upcasts each float8 "
                          "weight for its operation")
    if (c.validation_metrics != "none" or c.keep_best) and not c.validation_prompt:
        raise ConfigError("--validation_metrics and --keep_best score the validation images: give --validation_prompt")
    if c.keep_best and c.validation_metrics == "none":
        raise ConfigError("--keep_best needs scores: add --validation_metrics dreambench (or toy on the toy base)")
    check_toy_resolution(c, c.resolution)
    if c.max_timestep is not None and c.max_timestep <= c.min_timestep:
        raise ConfigError(f"--max_timestep ({c.max_timestep}) must be above --min_timestep ({c.min_timestep})")


def check_toy_resolution(c: TrainConfig, resolution: int | None) -> None:
    """ConfigError when --validation_metrics toy cannot score validation images of this size (None: not known yet;
    the trainer checks again once the model gives its own)."""
    problem = size_problem(resolution, "--resolution") if c.validation_metrics == "toy" else None
    if problem:
        raise ConfigError(f"--validation_metrics toy: {problem}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line (plus an optional --config file and --preset) -> a validated TrainConfig; a ConfigError about a
    flag the preset set says so. Prints one line for the preset and one for an optimizer's default learning rate."""
    values, from_preset, from_file, given = flag_values(argv, TrainConfig, PROG, DESCRIPTION, load_preset)
    _drop_orphans(values, from_preset, given)
    optimizer_default = "optimizer" in given and "learning_rate" not in given
    if optimizer_default:  # a preset's learning rate is for the preset's optimizer, not the one chosen here
        values["learning_rate"] = None
    try:
        config = TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(str(err) + _from_preset_note(str(err), values, from_preset)
                          + from_file_note(str(err), from_file)) from None
    if from_preset:
        print(f"Preset {config.preset}: {preset_path(config.preset)} (flags given on the command line win)")
    for note in [*unused_flag_notes(config, given), default_output_note(config, given | set(from_preset))]:
        if note:
            print(note)
    if optimizer_default:
        print(f"--optimizer {config.optimizer} without --learning_rate: learning rate {config.learning_rate:g}, "
              "that optimizer's usual value")
    return config


# Settings that act only with another one (on): a preset's value is dropped when the user turns that one off.
_DEPENDS_ON = {"token_abstraction": "train_text_encoder_ti", "embedding_lr": "train_text_encoder_ti",
               "prior_source": "with_prior_preservation", "keep_tokens": "shuffle_caption"}


def _drop_orphans(values: dict, from_preset: dict, given: set[str]) -> None:
    for key, parent in _DEPENDS_ON.items():
        if key in from_preset and key not in given and not values[parent]:
            values[key] = TrainConfig.__dataclass_fields__[key].default


def preset_config(name: str, **settings) -> TrainConfig:
    """The Python form of `--preset NAME`: the preset's values, then `settings` on top (they win)."""
    return TrainConfig(**{**load_preset(name, TrainConfig), "preset": name, **settings})


def _from_preset_note(message: str, values: dict, from_preset: dict) -> str:
    """" (--x: set by --preset NAME)" for the preset's flags that an error message names."""
    named = [key for key, value in from_preset.items() if f"--{key}" in message and values.get(key) == value]
    return f" ({', '.join(f'--{k}' for k in named)}: set by --preset {values['preset']})" if named else ""


def build_parser():
    return flags_parser(TrainConfig, PROG, DESCRIPTION)


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


# How the model card and the data report name each --prior_source.
PRIOR_SOURCE_NAMES = {"class_images": "class images",
                      "base_model": "the base model's own predictions, no class images"}


def preserves_base_output(config: TrainConfig) -> bool:
    """--with_prior_preservation --prior_source base_model."""
    return config.with_prior_preservation and config.resolved_prior_source == "base_model"


def uses_class_images(config: TrainConfig) -> bool:
    """--with_prior_preservation with class images: batches carry class rows read from --class_data_dir."""
    return config.with_prior_preservation and config.resolved_prior_source == "class_images"
