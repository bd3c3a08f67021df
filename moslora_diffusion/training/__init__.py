"""DreamBooth training with MoSLoRA adapters: `train(TrainConfig(...))` or `python train_dreambooth.py ...`."""

from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig, build_parser, parse_args
from .loop import TrainResult, train
from .outputs import OutputDirError
from .stopping import TrainingDiverged, TrainingInterrupted

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "TrainConfig", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "build_parser", "main", "parse_args", "train"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; exit status 0 when trained. No traceback for what a user can act on, one line each:
    2 for bad input, 1 when the training diverged (NaN / inf loss), 130 after Ctrl-C (saying how to resume)."""
    import sys

    from ..data import DatasetError
    from ..files.safetensors_io import WeightFileError
    from ..models.families import UnsupportedModelError
    from ..moslora.inject import AdapterError
    from .stopping import TrainingDiverged, TrainingInterrupted, interrupted_message

    config = None
    try:
        config = parse_args(argv)
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
