"""DreamBooth training with MoSLoRA adapters: `train(TrainConfig(...))` or `python train_dreambooth.py ...`."""

from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig, build_parser, parse_args
from .loop import TrainResult, train
from .outputs import OutputDirError

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "TrainConfig", "TrainResult", "build_parser", "main",
           "parse_args", "train"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one line `error: ...` and exit status 2 for bad input, no traceback unless --debug
    (console/exits.py, shared by every command)."""
    from ..console import run_command

    return run_command(lambda args: train(parse_args(args)), argv)
