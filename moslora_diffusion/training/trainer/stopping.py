"""Ending a run early without losing work or writing a broken file: a diverged loss, and Ctrl-C.

Diverged: the loop checks the losses (at every logging step, and before every checkpoint) and the adapter
weights (before every checkpoint and the final files) for NaN and inf. Nothing is saved after the first
non-finite value, so the newest checkpoint is the last good state; the run ends with TrainingDiverged
(the command exits 1) and writes no adapter and no export.

Ctrl-C and SIGTERM (a job manager's stop, the app's Cancel) are treated alike: single-process runs take
the signal between optimizer steps (CtrlC below), save checkpoint-<step> through the same atomic writer as
the periodic checkpoints, and end with TrainingInterrupted (the command exits 130 after Ctrl-C, 143 after
SIGTERM: 128 + the signal number) saying how to resume. A second signal stops at once: a checkpoint being
written is left as checkpoint-<step>.tmp, which `latest` never picks. Multi-process runs do not save on a
signal (every process would have to stop at the same step); they keep their periodic checkpoints.
"""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..run_folder.checkpoints import list_checkpoints

RESUME_HINT = "run the same command again with --resume_from_checkpoint latest (same --output_dir)"


class TrainingDiverged(RuntimeError):
    """The loss or the adapter weights became NaN or inf; nothing was saved from that point on."""

    exit_status = 1  # what the commands exit with (console/exits.py): not an input error, not a bug


# What each stop signal is called in the messages; the command exits 128 + its number, the shells' convention.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run; the message says what was saved and how to resume.

    exit_status: what the command exits with, 128 + the signal's number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


class StopRequested(KeyboardInterrupt):
    """The first stop signal, raised only where stopping loses nothing (never inside an optimizer update)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (loading, class images, final files): stops like Ctrl-C there."""


def sigterm_as_interrupt(signum, frame) -> None:
    raise Terminated


@contextmanager
def catch_sigterm():
    """While inside, SIGTERM stops the command as Ctrl-C does (one line, no traceback) instead of killing it
    silently. Only in the main thread and over the default action (a handler someone installed is kept)."""
    previous = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)):
        previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class CtrlC:
    """SIGINT (Ctrl-C) and SIGTERM handling around the training loop; both are handled alike.

    A first signal raises StopRequested at once while a step's micro-batches run (only gradients exist then,
    so the unfinished step is discarded) or between steps (logging, validation, a periodic checkpoint).
    From begin_update() to end_update() (the optimizer update, until the loop has recorded the finished step)
    it is only noted, and end_update() raises it. A second signal raises KeyboardInterrupt, whatever runs.
    `signum` says which signal came first. Installed only in the main thread and over the default handlers
    (Python's for SIGINT; the default action or catch_sigterm's for SIGTERM): a process started with a
    signal ignored, e.g. in the background, keeps ignoring it; a no-op when `enabled` is False.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self.updating = False
        self.update_finished_first = False  # the first signal came during an update, which was then completed
        self.signum = signal.SIGINT
        self._previous: dict[int, object] = {}

    def __enter__(self) -> CtrlC:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: (signal.default_int_handler,),
                    signal.SIGTERM: (signal.SIG_DFL, None, sigterm_as_interrupt)}
        for signum, replaceable in defaults.items():
            if signal.getsignal(signum) in replaceable:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested, self.signum = True, signum
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
                        how: str = "", saved: bool = False, signum: int = signal.SIGINT) -> str:
    """One line: where the run stopped, what holds its state, how to resume.

    done: the last finished step (None: stopped outside the training loop, or by a second signal);
    how: what happened to the step in progress; saved: checkpoint-<done> holds the state;
    signum: the signal that stopped it (SIGINT: "Ctrl-C", SIGTERM).
    """
    by = f"Stopped by {STOP_SIGNALS.get(signum, signal.Signals(signum).name)}"
    if done is None:
        newest = newest_checkpoint(output_dir) if output_dir else None
        if newest is None:
            return f"{by}; no checkpoint was saved, so a new run starts from step 0"
        return f"{by}; the newest complete checkpoint is {newest} in {output_dir}. To continue, {RESUME_HINT}"
    where = f"{by} at step {done} of {total}" + (f" ({how})" if how else "")
    if not saved:
        return f"{where}; nothing was trained yet, so there is nothing to resume"
    return f"{where}; checkpoint-{done} in {output_dir} holds this state. To continue, {RESUME_HINT}"
