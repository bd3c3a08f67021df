"""How a training command ends: one line for whatever a user can act on, never a traceback.

Shared by `train_dreambooth.py` (training/__init__.py main) and `python -m moslora_diffusion.mole train`.
Exit status (console/exits.py): 0 trained, 2 bad input, 1 the training diverged (NaN / inf loss:
TrainingDiverged.exit_status), 130 after Ctrl-C, with the line saying how to resume.
"""

from __future__ import annotations

from ...console import run_command
from .stopping import TrainingInterrupted, interrupted_message


def run_training_command(parse, train, argv: list[str] | None = None) -> int:
    """`parse(argv)` -> config, then `train(config)` under console.run_command (which prints the one line and
    raises SystemExit with the status above); returns 0 when trained."""

    def body(args: list[str]) -> None:
        config = parse(args)
        try:
            train(config)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # outside the loop (loading, class images, final files), or a second Ctrl-C
            raise TrainingInterrupted(interrupted_message(config.output_dir)) from None

    return run_command(body, argv)
