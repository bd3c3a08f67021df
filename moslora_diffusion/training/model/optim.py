"""Optimizer and learning-rate schedule for the adapter parameters."""

from __future__ import annotations

import importlib.util

import torch

from ..settings.config import ConfigError, TrainConfig

_OPTIONAL = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
             "prodigy": ("prodigyopt", "pip install prodigyopt")}
# --report_to trackers (through accelerate) and the package each needs.
_TRACKERS = {"wandb": ("wandb", "pip install wandb (or use --report_to tensorboard)"),
             "tensorboard": ("tensorboard", "pip install tensorboard (or use --report_to none)")}


def check_optimizer_available(name: str) -> None:
    """Fails before any model is loaded when the optional optimizer package is missing."""
    if name in _OPTIONAL:
        module, hint = _OPTIONAL[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--optimizer {name} needs the {module} package, which is not installed: {hint}")


def check_packages(config: TrainConfig) -> None:
    """What the settings need from outside, checked by both trainers before anything loads or is written: the
    optional packages of --optimizer and --report_to (ConfigError naming the package and the pip command), and
    the scorer models of --validation_metrics dreambench (fetched into the hub cache now, not at the first
    validation: OSError at once when the hub cannot be reached)."""
    check_optimizer_available(config.optimizer)
    if config.report_to in _TRACKERS:
        module, hint = _TRACKERS[config.report_to]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report_to {config.report_to} needs the {module} package, which is not "
                              f"installed: {hint}")
    if config.validation_metrics == "dreambench":
        from ...evaluation.hf_scorers import checked_source

        checked_source(config.dino_model, "ViTModel")
        checked_source(config.clip_model, "CLIPModel")


def param_groups(config: TrainConfig, unet_params: list, text_params: list) -> list[dict]:
    groups = [{"params": unet_params, "lr": config.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr or config.learning_rate})
    return groups


def make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    check_optimizer_available(config.optimizer)
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if config.optimizer == "prodigy":
        import prodigyopt

        # Prodigy estimates the step size itself; lr acts as a multiplier (1.0 is its intended value).
        return prodigyopt.Prodigy(groups, betas=kwargs["betas"], weight_decay=kwargs["weight_decay"],
                                  eps=kwargs["eps"])
    return torch.optim.AdamW(groups, **kwargs)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps)
