"""Whether the output folder can take the run, checked before anything is loaded or written: a folder that
cannot be written or a disk without room is a one-line error, not a traceback after the model loaded."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from ...files.atomic import FREE_SPACE_MARGIN
from ..settings.config import TrainConfig

MIB = 2**20
# Optimizer state per adapter parameter, in fp32 copies: AdamW's two moments, 8-bit AdamW's two 1-byte
# moments, Prodigy's two moments plus its s and p0 buffers.
_OPTIMIZER_STATE = {"adamw": 2.0, "adamw8bit": 0.5, "prodigy": 4.0}


class OutputDirError(ValueError):
    """The output folder holds something this run must not overwrite, or cannot take the run."""


def nearest_existing(folder: Path) -> Path:
    """`folder` itself, or its closest ancestor that exists (where it would be created)."""
    folder = folder.absolute()
    return next(p for p in (folder, *folder.parents) if p.exists())


def check_writable(output_dir: str) -> None:
    """Refuses an output folder that is a file, lies under a file, or cannot be created or written."""
    folder = Path(output_dir)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "is a file" if existing == folder.absolute() else f"cannot be created: {existing} is a file"
        raise OutputDirError(f"--output_dir {output_dir} {where}, not a folder; choose another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output_dir {output_dir} cannot be written (no write permission on {existing}); "
                             "choose a folder you can write to")


def check_logging_dir(config: TrainConfig) -> None:
    """Refuses a --logging_dir that is a file or lies under one while a tracker will write there: the tracker's
    mkdir failed only after the model loaded, with a raw `[Errno 20] Not a directory`."""
    if config.report_to == "none":  # no tracker, nothing is written there
        return
    folder = (Path(config.output_dir) / config.logging_dir).absolute()  # an absolute --logging_dir stands alone
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise OutputDirError(f"--logging_dir {config.logging_dir} {where}, not a folder; choose another "
                             f"--logging_dir for the {config.report_to} logs, or pass --report_to none")


def expected_steps(config: TrainConfig, num_images: int, num_processes: int) -> int:
    """--max_train_steps, or a lower bound of the epochs' steps (buckets only add batches)."""
    if config.max_train_steps:
        return config.max_train_steps
    batches = math.ceil(num_images / (config.train_batch_size * num_processes))
    return config.num_train_epochs * math.ceil(batches / config.gradient_accumulation_steps)


def written_bytes(config: TrainConfig, adapter_params: int, steps: int, start_step: int = 0) -> tuple[int, int]:
    """(bytes, checkpoints): about what a run from start_step to steps writes into its folder, images and logs
    left out.

    The adapter is fp32 (A, M, B); the final files hold it three times (native, diffusers, kohya); a
    checkpoint holds it with the optimizer state and the EMA copy.
    """
    adapter = 4 * adapter_params
    checkpoint = adapter * (1 + _OPTIMIZER_STATE[config.optimizer] + (1 if config.use_ema else 0))
    kept = steps // config.checkpointing_steps - start_step // config.checkpointing_steps
    if config.checkpoints_total_limit is not None:  # the new one is complete before the oldest goes
        kept = min(kept, config.checkpoints_total_limit + 1)
    return int(3 * adapter + kept * checkpoint), kept


def check_room(config: TrainConfig, adapter_params: int = 0, num_images: int = 0, num_processes: int = 1,
               start_step: int = 0) -> None:
    """Refuses a run whose disk lacks room for what it writes plus the margin every atomic write keeps.

    Before the model loads the adapter size is unknown (adapter_params=0): only the margin is checked.
    """
    folder = nearest_existing(Path(config.output_dir))
    steps = max(expected_steps(config, num_images, num_processes), start_step)
    needed, checkpoints = written_bytes(config, adapter_params, steps, start_step)
    free = shutil.disk_usage(folder).free
    if needed + FREE_SPACE_MARGIN <= free:
        return
    if adapter_params:
        need = (f"this run needs about {math.ceil((needed + FREE_SPACE_MARGIN) / MIB)} MiB (the adapter, its "
                f"exports and {checkpoints} checkpoints: {needed / MIB:.1f} MiB, plus {FREE_SPACE_MARGIN // MIB} "
                "MiB kept free)")
    else:
        need = f"a run needs at least {FREE_SPACE_MARGIN // MIB} MiB free to write its files safely"
    raise OutputDirError(f"not enough free disk space in {folder}: {free // MIB} MiB free, and {need}; "
                         "free space or choose another --output_dir")
