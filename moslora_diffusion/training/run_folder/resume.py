"""Resuming from a checkpoint: which settings may change, and the check, before the model loads, that the
others did not.

A checkpoint restores the optimizer state (its parameter groups carry the learning rates, betas, epsilon
and weight decay it was built with), the schedule's base learning rates, and the data position (optimizer
steps x micro-batches per step x global batch). A new value of any of these would be silently overridden
or would shift the data, so they must equal the checkpoint's: RESTORED_SETTINGS, plus the global batch.
Every other setting (more steps, the schedule's shape and warm-up, validation, checkpoint interval, loss
weighting, precision...) takes effect from the resumed step on and is what training_config.json records.
Adapter shape, targets and model family are checked once the model is loaded (check_compatible).
"""

from __future__ import annotations

import warnings
from dataclasses import fields

from ..settings.config import TrainConfig
from .checkpoints import CheckpointError, CheckpointInfo, find_resume_checkpoint
from .outputs import read_record

RESTORED_SETTINGS = ("learning_rate", "text_encoder_lr", "embedding_lr", "optimizer", "adam_beta1", "adam_beta2",
                     "adam_weight_decay", "adam_epsilon", "gradient_accumulation_steps")
GLOBAL_BATCH = "global_batch"  # train_batch_size x processes: images per micro-step


def resume_settings(config: TrainConfig | dict, num_processes: int | None) -> dict:
    """The settings a checkpoint restores state for, as saved in its state.json under "settings"."""
    # A record of an older version lacks the newer settings: they had their defaults there.
    values = {**{f.name: f.default for f in fields(TrainConfig)},
              **(config if isinstance(config, dict) else config.to_dict())}
    settings = {name: values[name] for name in RESTORED_SETTINGS}
    # The text encoders' rate only exists with --train_text_encoder, and defaults to --learning_rate.
    text_lr = values["text_encoder_lr"] or values["learning_rate"]
    settings["text_encoder_lr"] = text_lr if values["train_text_encoder"] else None
    settings["embedding_lr"] = (values.get("embedding_lr") or values["learning_rate"]
                                ) if values.get("train_text_encoder_ti") else None
    settings[GLOBAL_BATCH] = values["train_batch_size"] * num_processes if num_processes else None
    return settings


def _recorded(info: CheckpointInfo) -> dict | None:
    if "settings" in info.state:
        return info.state["settings"]
    # A checkpoint written before checkpoints recorded their settings: its own run's training_config.json.
    record = read_record(info.path.parent)
    if record is None:
        return None
    return resume_settings(record["config"], (record.get("plan") or {}).get("num_processes"))


def _describe(name: str, value) -> str:
    if name == GLOBAL_BATCH:
        return f"a global batch of {value} (--train_batch_size x processes)"
    return f"--{name} {value}"


def check_resume_settings(info: CheckpointInfo, config: TrainConfig, num_processes: int) -> None:
    """CheckpointError naming every restored setting that differs from the checkpoint's."""
    recorded = _recorded(info)
    if recorded is None:
        warnings.warn(f"checkpoint {info.path} does not record the settings it was made with, so they cannot be "
                      "checked: its optimizer state keeps its learning rates and Adam settings, and another batch "
                      "or gradient accumulation would shift the data", stacklevel=2)
        return
    ours = resume_settings(config, num_processes)
    differing = [k for k in ours if recorded.get(k) is not None and recorded.get(k) != ours[k]]
    if differing:
        theirs = ", ".join(_describe(k, recorded[k]) for k in differing)
        mine = ", ".join(_describe(k, ours[k]) for k in differing)
        raise CheckpointError(
            f"checkpoint {info.path} was made with {theirs}, but this run has {mine}: the optimizer, schedule and "
            "data position it restores depend on them; pass the checkpoint's values to resume from it (steps, "
            "schedule shape, validation and the other settings may change), or start a new run without "
            "--resume_from_checkpoint")


def find_resume(config: TrainConfig, num_processes: int) -> CheckpointInfo | None:
    """The checkpoint to resume from (None: start at step 0), its restored settings checked."""
    info = find_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if info is not None:
        if config.max_train_steps is not None and info.step > config.max_train_steps:
            raise CheckpointError(f"checkpoint {info.path} is at step {info.step}, past --max_train_steps "
                                  f"{config.max_train_steps}: pass a larger --max_train_steps to train on from it")
        check_resume_settings(info, config, num_processes)
    return info
