"""The training configuration: one frozen dataclass, validated on construction, and its command line.

Every field is a flag of the same name (`--learning_rate`, ...), named as in diffusers'
train_dreambooth_lora(_sdxl).py where those scripts have the setting. `--config run.yaml` (or .toml)
may hold any flag; flags given on the command line override the file. The parsed values are turned
into a TrainConfig once and never changed afterwards: settings that depend on the model (the default
resolution, the number of steps) are resolved into a separate RunPlan by the trainer.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..console import add_debug_flag
from ..moslora.inject import UNET_TARGET_PRESETS, AdapterConfig, resolve_targets
from ..moslora.layer import KINDS, MIXER_INITS

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# torch.compile backends worth offering: inductor generates fused kernels; aot_eager only traces (for debugging).
DYNAMO_BACKENDS = ("inductor", "aot_eager")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
# diffusers.optimization.SchedulerType values (kept here so `--help` needs no diffusers import), except
# piecewise_constant, which needs step rules that no flag gives.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

# Settings that steer a run without defining what it learns: they may differ when a run is resumed in
# the same output folder (e.g. more steps, another checkpoint interval).
RUN_CONTROL_FIELDS = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "num_train_epochs", "checkpointing_steps",
    "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_steps",
    "validation_inference_steps", "report_to", "logging_dir", "logging_steps", "dataloader_num_workers",
    "gradient_checkpointing", "sample_batch_size", "latent_disk_cache", "latent_cache_dir",
    "channels_last", "torch_compile", "dynamo_backend",
})


class ConfigError(ValueError):
    """A setting is missing, out of range or inconsistent with another one."""


def _flag(default, help: str, choices: tuple | None = None, group: str = "training"):
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass(frozen=True)
class TrainConfig:
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
    # prior preservation
    with_prior_preservation: bool = _flag(False, "add the class prior-preservation loss", group="prior preservation")
    class_data_dir: str | None = _flag(None, "folder of class images; missing ones are generated",
                                       group="prior preservation")
    class_prompt: str | None = _flag(None, "prompt of the class, e.g. 'a photo of a dog'", group="prior preservation")
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
    # optimisation
    learning_rate: float = _flag(1e-4, "learning rate of the UNet adapters")
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
        _check_types(self)
        _check_required(self)
        _check_ranges(self)
        _check_choices(self)
        resolve_targets(self.target_modules, UNET_TARGET_PRESETS)  # raises on an empty list

    @property
    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(kind=self.adapter, rank=self.rank, alpha=self.lora_alpha, mixer_init=self.mixer_init)

    @property
    def unet_targets(self) -> tuple[str, ...]:
        return resolve_targets(self.target_modules, UNET_TARGET_PRESETS)

    def to_dict(self) -> dict:
        return asdict(self)

    def run_defining(self) -> dict:
        """The settings that decide what is learned (a resumed run must agree on all of them)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_FIELDS}


@functools.cache
def _field_types() -> dict[str, tuple[type, bool]]:
    """{name: (base type, optional)} from the annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if args else hint
        out[name] = (base, optional)
    return out


def _check_types(config: TrainConfig) -> None:
    for name, (base, optional) in _field_types().items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, name, float(value))  # 1 in a YAML file means 1.0
            ok = True
        if not ok:
            raise ConfigError(f"--{name} must be {base.__name__}, got {value!r}")


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
        if not c.class_data_dir:
            raise ConfigError("--with_prior_preservation needs --class_data_dir (missing images are generated there)")


_POSITIVE = ("rank", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "num_class_images",
             "sample_batch_size", "class_inference_steps", "num_validation_images", "validation_steps",
             "validation_inference_steps", "checkpointing_steps", "logging_steps", "learning_rate", "adam_epsilon")
_NON_NEGATIVE = ("lr_warmup_steps", "max_grad_norm", "adam_weight_decay", "noise_offset", "prior_loss_weight",
                 "min_timestep", "dataloader_num_workers")
_POSITIVE_OR_NONE = ("max_train_steps", "lora_alpha", "text_encoder_lr", "snr_gamma", "checkpoints_total_limit",
                     "resolution", "max_timestep")


def _check_ranges(c: TrainConfig) -> None:
    for name in _POSITIVE:
        if not getattr(c, name) > 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(c, name)}")
    for name in _NON_NEGATIVE:
        if getattr(c, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(c, name)}")
    for name in _POSITIVE_OR_NONE:
        value = getattr(c, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name} must be > 0 when given, got {value}")
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    if c.resolution is not None and c.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {c.resolution}")
    if c.overwrite_output_dir and c.resume_from_checkpoint:
        raise ConfigError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would resume "
                          "from; pass one of them")
    if c.fp8_base and c.mixed_precision == "no":
        raise ConfigError("--fp8_base needs --mixed_precision bf16 or fp16: autocast is what upcasts each float8 "
                          "weight for its operation")
    if c.max_timestep is not None and c.max_timestep <= c.min_timestep:
        raise ConfigError(f"--max_timestep ({c.max_timestep}) must be above --min_timestep ({c.min_timestep})")


def _check_choices(c: TrainConfig) -> None:
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        if choices and getattr(c, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {list(choices)}, got {getattr(c, f.name)!r}")


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_dreambooth.py", description="DreamBooth fine-tuning of Stable Diffusion with MoSLoRA adapters.")
    parser.add_argument("--config", help="YAML or TOML file with any of the flags below (flags given here win)")
    add_debug_flag(parser)  # for --help; the command runner takes --debug off before parsing
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = _field_types()
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        base, _ = types[f.name]
        help_text = meta["help"] + ("" if f.default in (None, False) else f" (default: {f.default})")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help: "30% faster" would break --help
        if base is bool:
            # --flag / --no-flag, so the command line can switch off what a config file switched on.
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=base, default=f.default, choices=meta["choices"], help=help_text)
    return parser


def load_config_file(path: str | Path) -> dict:
    """The flags in a YAML or TOML file, checked against the known names."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml", ".json"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: expected a .yaml, .yml, .toml or .json file")
    except ConfigError:
        raise
    except Exception as err:  # yaml and tomllib raise their own error types
        raise ConfigError(f"--config {path} cannot be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"--config {path}: unknown setting {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line (plus an optional --config file) -> a validated TrainConfig."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    values.pop("debug")
    return TrainConfig(**values)


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
