"""Ending a run early without losing work or writing a broken file: a diverged loss, and Ctrl-C.

Diverged: the loop checks the losses (at every logging step, and before every checkpoint) and the adapter
weights (before every checkpoint and the final files) for NaN and inf. Nothing is saved after the first
non-finite value, so the newest checkpoint is the last good state; the run ends with TrainingDiverged
(the command exits 1) and writes no adapter and no export.

Ctrl-C: single-process runs take SIGINT between optimizer steps (CtrlC below), save checkpoint-<step>
through the same atomic writer as the periodic checkpoints, and end with TrainingInterrupted (the command
exits 130) saying how to resume. A second Ctrl-C stops at once: a checkpoint being written is left as
checkpoint-<step>.tmp, which `latest` never picks. Multi-process runs do not save on Ctrl-C (every process
would have to stop at the same step); they keep their periodic checkpoints.
"""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path

from ..run_folder.checkpoints import list_checkpoints

RESUME_HINT = "run the same command again with --resume_from_checkpoint latest (same --output_dir)"


class TrainingDiverged(RuntimeError):
    """The loss or the adapter weights became NaN or inf; nothing was saved from that point on."""

    exit_status = 1  # what the commands exit with (console/exits.py): not an input error, not a bug


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run; the message says what was saved and how to resume."""


class StopRequested(KeyboardInterrupt):
    """The first Ctrl-C, raised only where stopping loses nothing (never inside an optimizer update)."""


class CtrlC:
    """SIGINT handling around the training loop.

    A first Ctrl-C raises StopRequested at once while a step's micro-batches run (only gradients exist then,
    so the unfinished step is discarded) or between steps (logging, validation, a periodic checkpoint).
    From begin_update() to end_update() (the optimizer update, until the loop has recorded the finished step)
    it is only noted, and end_update() raises it. A second Ctrl-C raises KeyboardInterrupt,
    whatever runs. Installed only in the main thread and over Python's default handler (a process started
    with SIGINT ignored, e.g. in the background, keeps ignoring it); a no-op when `enabled` is False.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self.updating = False
        self.update_finished_first = False  # the first Ctrl-C came during an update, which was then completed
        self._previous = None

    def __enter__(self) -> CtrlC:
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.updating:
            raise StopRequested
        self.update_finished_first = True  # the update takes milliseconds: no notice, the final line says it

    def begin_update(self) -> None:
        """From here weights, Adam moments, schedule and EMA change together: a first Ctrl-C only waits."""
        self.updating = True

    def end_update(self) -> None:
        """Called once the loop has recorded the finished step; raises StopRequested for a Ctrl-C that waited."""
        self.updating = False
        if self.requested:
            raise StopRequested


def newest_checkpoint(output_dir: str | Path) -> str | None:
    with warnings.catch_warnings():  # incomplete ones are skipped; the warning adds nothing here
        warnings.simplefilter("ignore")
        found = list_checkpoints(output_dir)
    return found[-1].path.name if found else None


def diverged_message(config, step: int, what: str) -> str:
    """One line: when it happened, what was kept, what to try."""
    kept = newest_checkpoint(config.output_dir)
    kept = f"{kept}, the last good state, is kept" if kept else "no checkpoint had been saved yet"
    tips = [f"a lower --learning_rate (this run: {config.learning_rate:g})"]
    if config.mixed_precision == "fp16":
        tips.append("--mixed_precision bf16 (or no, for fp32) instead of fp16")
    if config.max_grad_norm == 0:
        tips.append("--max_grad_norm 1")
    return (f"training diverged: the {what} at step {step}; stopped without writing an adapter ({kept} in "
            f"{config.output_dir}). Start again with {' or '.join(tips)}, in a new --output_dir")


def interrupted_message(output_dir: str | Path | None, done: int | None = None, total: int | None = None,
                        how: str = "", saved: bool = False) -> str:
    """One line: where the run stopped, what holds its state, how to resume.

    done: the last finished step (None: stopped outside the training loop, or by a second Ctrl-C);
    how: what happened to the step in progress; saved: checkpoint-<done> holds the state.
    """
    if done is None:
        newest = newest_checkpoint(output_dir) if output_dir else None
        if newest is None:
            return "Stopped by Ctrl-C; no checkpoint was saved, so a new run starts from step 0"
        return (f"Stopped by Ctrl-C; the newest complete checkpoint is {newest} in {output_dir}. To continue, "
                f"{RESUME_HINT}")
    where = f"Stopped by Ctrl-C at step {done} of {total}" + (f" ({how})" if how else "")
    if not saved:
        return f"{where}; nothing was trained yet, so there is nothing to resume"
    return f"{where}; checkpoint-{done} in {output_dir} holds this state. To continue, {RESUME_HINT}"
