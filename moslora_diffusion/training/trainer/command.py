"""How a training command ends: one line for whatever a user can act on, never a traceback.

Shared by `train_dreambooth.py` (training/__init__.py main) and `python -m moslora_diffusion.mole train`.
Exit status (console/exits.py): 0 trained, 2 bad input, 1 the training diverged (NaN / inf loss:
TrainingDiverged.exit_status), 130 after Ctrl-C and 143 after SIGTERM, with the line saying how to resume.
"""

from __future__ import annotations

import signal

from ...console import run_command
from .stopping import Terminated, TrainingInterrupted, catch_sigterm, interrupted_message


def run_training_command(parse, train, argv: list[str] | None = None) -> int:
    """`parse(argv)` -> config, then `train(config)` under console.run_command (which prints the one line and
    raises SystemExit with the status above); returns 0 when trained."""

    def body(args: list[str]) -> None:
        config = parse(args)
        try:
            with catch_sigterm():  # a job manager's stop or the app's Cancel: one line and a checkpoint, as Ctrl-C
                train(config)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as err:  # outside the loop (loading, class images, final files), or a second signal
            signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
            raise TrainingInterrupted(interrupted_message(config.output_dir, signum=signum), signum) from None

    return run_command(body, argv)
