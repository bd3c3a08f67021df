"""The settings of `python -m moslora_diffusion.mole train`: the DreamBooth trainer's flags plus the experts.

GateTrainConfig is a TrainConfig, so the gate trainer parses, checks, records and resumes its settings exactly
like `train_dreambooth.py` (same flag names, `--config run.yaml`, the same number ranges). The flags that
configure a new adapter (rank, mixer, targets...) do not apply to gates and are hidden; the photos and prompts
come per expert instead of one --instance_data_dir / --instance_prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..checks import Range
from ..training.config import NUMBER_RANGES, TrainConfig, check_number_ranges
from ..training.flags import ConfigError, build_parser, flag, parse_flags
from .experts import MAX_EXPERTS, MIN_EXPERTS

PROG = "python -m moslora_diffusion.mole train"
DESCRIPTION = ("Train MoLE gates (Mixture of LoRA Experts, arXiv 2404.13628) that compose 2 to 8 trained LoRAs: "
               "only the gates train, on each expert's photos with its prompt.")
GATE_NUMBER_RANGES = {**NUMBER_RANGES, "balance_weight": Range(0)}


@dataclass(frozen=True)
class GateTrainConfig(TrainConfig):
    # Flags of a new adapter, or of a single subject: not flags of this command (they keep their defaults).
    HIDDEN_FLAGS: ClassVar[frozenset[str]] = frozenset({
        "instance_data_dir", "instance_prompt", "adapter", "rank", "lora_alpha", "mixer_init", "target_modules",
        "train_text_encoder", "text_encoder_lr", "fp8_base", "torch_compile", "dynamo_backend",
        "validation_loss_photos", "train_text_encoder_ti", "token_abstraction", "embedding_lr"})

    experts: tuple | None = flag(
        None, f"the {MIN_EXPERTS} to {MAX_EXPERTS} experts: training output folders, moslora.safetensors, diffusers "
        "or kohya LoRA files (safetensors only) (required)", group="experts")
    expert_data_dirs: tuple | None = flag(
        None, "each expert's photo folder, in --experts order (default: the folder its training run recorded)",
        group="experts")
    expert_prompts: tuple | None = flag(
        None, "each expert's prompt, in --experts order (default: the trigger prompt its file records; caption "
        "sidecars next to the photos win, as in DreamBooth training)", group="experts")
    balance_weight: float = flag(
        0.5, "weight of the gate-balancing loss -log prod_i q_i (q_i: expert i's mean gate weight; the paper's "
        "0.5); 0 turns it off", group="experts")
    spatial_gates: bool = flag(
        False, "evaluate each UNet block's gate per latent position (spatial MoLE: an expert can win one part of "
        "the image and another the rest) instead of once per block", group="experts")
    learning_rate: float = flag(1e-3, "learning rate of the gates")
    output_dir: str = flag("mole-gates", "where mole.safetensors and the run's files go", group="output")

    def check_required(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required: the base model the experts were "
                              "trained on (hub id, diffusers folder or .safetensors)")
        count = len(self.experts or ())
        if not MIN_EXPERTS <= count <= MAX_EXPERTS:
            raise ConfigError(f"--experts takes {MIN_EXPERTS} to {MAX_EXPERTS} adapters, got {count}")
        for name in ("expert_data_dirs", "expert_prompts"):
            given = getattr(self, name)
            if given is not None and len(given) != count:
                raise ConfigError(f"--{name}: {len(given)} given for {count} --experts; give one per expert, "
                                  "in the same order")
        if self.expert_prompts is not None and not all(p.strip() for p in self.expert_prompts):
            raise ConfigError("--expert_prompts: an empty prompt; give each expert its trigger prompt")
        if self.with_prior_preservation and not ((self.class_prompt or "").strip() and self.class_data_dir):
            raise ConfigError("--with_prior_preservation needs --class_prompt and --class_data_dir")
        if self.prior_source == "base_model":
            raise ConfigError("--prior_source base_model is for DreamBooth runs; the gate trainer's prior "
                              "preservation takes class images (--class_data_dir)")

    def check_ranges(self) -> None:
        check_number_ranges(self, GATE_NUMBER_RANGES)


def parse_gate_args(argv: list[str] | None = None) -> GateTrainConfig:
    """Command line (plus an optional --config file) -> a validated GateTrainConfig."""
    return parse_flags(argv, GateTrainConfig, PROG, DESCRIPTION)


def gate_parser():
    return build_parser(GateTrainConfig, PROG, DESCRIPTION)
