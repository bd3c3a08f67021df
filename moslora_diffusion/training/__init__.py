"""DreamBooth training with MoSLoRA adapters: `train(TrainConfig(...))` or `python train_dreambooth.py ...`."""

from .run_folder.checkpoints import CheckpointError
from .run_folder.outputs import OutputDirError
from .settings.config import ConfigError, TrainConfig, build_parser, parse_args
from .trainer.loop import TrainResult, train
from .trainer.stopping import TrainingDiverged, TrainingInterrupted

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "TrainConfig", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "build_parser", "main", "parse_args", "train"]


def main(argv: list[str] | None = None) -> int:
    """`python train_dreambooth.py ...`: 0 when trained; else one line and the exit status of command.py."""
    from .trainer.command import run_training_command

    return run_training_command(parse_args, train, argv)
