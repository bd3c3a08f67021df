"""DreamBooth training with MoSLoRA adapters: `train(TrainConfig(...))` or `python train_dreambooth.py ...`."""

from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig, build_parser, parse_args
from .loop import TrainResult, train
from .outputs import OutputDirError

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "TrainConfig", "TrainResult", "build_parser", "main",
           "parse_args", "train"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: a clear one-line error (exit status 2) for bad input, no traceback."""
    import sys

    from ..data import DatasetError
    from ..files.safetensors_io import WeightFileError
    from ..models.families import UnsupportedModelError
    from ..moslora.inject import AdapterError

    try:
        config = parse_args(argv)
        train(config)
    except (ConfigError, CheckpointError, OutputDirError, DatasetError, AdapterError, UnsupportedModelError,
            WeightFileError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
