"""How a training command ends: one line for whatever a user can act on, never a traceback.

Shared by `train_dreambooth.py` (training/__init__.py main) and `python -m moslora_diffusion.mole train`.
Exit status: 0 trained, 2 bad input, 1 the training diverged (NaN / inf loss), 130 after Ctrl-C (saying how
to resume).
"""

from __future__ import annotations

import sys

from ..data import DatasetError
from ..files.safetensors_io import WeightFileError
from ..models.families import UnsupportedModelError
from ..moslora.inject import AdapterError
from .checkpoints import CheckpointError
from .config import ConfigError
from .outputs import OutputDirError
from .stopping import TrainingDiverged, TrainingInterrupted, interrupted_message


def run_training_command(parse, train, argv: list[str] | None = None) -> int:
    """`parse(argv)` -> config, then `train(config)`; returns the exit status (see above)."""
    config = None
    try:
        config = parse(argv)
        train(config)
    except (ConfigError, CheckpointError, OutputDirError, DatasetError, AdapterError, UnsupportedModelError,
            WeightFileError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the loop (loading, class images, final files), or a second Ctrl-C
        print("\n" + interrupted_message(config.output_dir if config else None), file=sys.stderr)
        return 130
    return 0
