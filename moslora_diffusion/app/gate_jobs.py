"""MoLE gate training from the app: `python -m moslora_diffusion.mole train` for loaded adapters, as a job of the
Train tab's TrainingManager (background process group, live progress from progress.jsonl, cancel).

Each expert's photos and prompt default to what its adapter records (the folder its training run read, the
instance prompt) and may be edited. A photo folder must be one the app may read: inside --photos_dir, the
app's outputs (photos uploaded for training), or the folder the adapter itself records.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import Range, number_problems
from ..files.safetensors_io import read_metadata
from ..formats.lora_files import trigger_prompt
from ..mole import FILE_NAME, MAX_EXPERTS, MIN_EXPERTS
from ..mole.experts import photo_dir
from .paths import AllowedRoots, PathNotAllowedError
from .training_jobs import MAX_TRAIN_STEPS, TrainingError, TrainingJob, new_run_dir
from .uploads import check_photo_folder

GATE_RANGES = {
    "steps": Range(1, MAX_TRAIN_STEPS, integer=True),
    "resolution": Range(64, 2048, integer=True, multiple_of=8, optional=True),
    "learning_rate": Range(0, 1, open_lower=True, label="learning rate"),
    "balance_weight": Range(0, 100, label="balance weight"),
}


@dataclass
class GateSettings:
    experts: list[str]  # names of loaded adapters, 2..8
    photo_dirs: list[str] = field(default_factory=list)  # one per expert, in order
    prompts: list[str] = field(default_factory=list)  # one per expert, in order
    steps: int = 200
    resolution: int | None = None  # None: the model's own
    learning_rate: float = 1e-3  # the gate trainer's default
    balance_weight: float = 0.5  # the paper's

    def check(self) -> None:
        """TrainingError naming every problem; on success the numbers are clean ints / floats."""
        n = len(self.experts)
        problems = [] if MIN_EXPERTS <= n <= MAX_EXPERTS else [
            f"choose {MIN_EXPERTS} to {MAX_EXPERTS} loaded adapters as experts (chosen: {n})"]
        for label, given in (("photo folder", self.photo_dirs), ("prompt", self.prompts)):
            if len(given) != n:
                problems.append(f"give one {label} per expert, one a line in the experts' order ({len(given)} for {n})")
            elif not all(str(g).strip() for g in given):
                problems.append(f"an empty {label}: give every expert one")
        numbers = {name: getattr(self, name) for name in GATE_RANGES}
        problems += number_problems(numbers, GATE_RANGES)
        if problems:
            raise TrainingError("; ".join(problems))
        for name, value in numbers.items():
            setattr(self, name, GATE_RANGES[name].clean(value))


def expert_defaults(adapter: Path) -> tuple[str, str]:
    """(photo folder, prompt) an adapter file records ("" when it does not)."""
    metadata = read_metadata(adapter)
    return str(photo_dir(adapter, metadata) or ""), str(trigger_prompt(metadata) or "")


def check_photo_dirs(settings: GateSettings, files: list[Path], photo_roots: AllowedRoots, outputs: Path
                     ) -> list[Path]:
    """Each expert's photo folder, resolved and scanned by content (check_photo_folder); PathNotAllowedError for a
    folder outside what the app may read, UploadError for one without usable photos."""
    allowed = AllowedRoots([*photo_roots.roots, outputs])
    for file in files:
        recorded = expert_defaults(file)[0]
        if recorded:
            allowed.add(recorded)
    folders = []
    for given in settings.photo_dirs:
        try:
            folders.append(check_photo_folder(given.strip(), allowed)[0])
        except PathNotAllowedError:
            raise PathNotAllowedError(f"{given}: photo folders must lie in the --photos_dir folders, the app's "
                                      "outputs, or be the folder the adapter records") from None
    return folders


def build_gate_command(base: str, files: list[Path], photo_dirs: list[Path], settings: GateSettings,
                       output_dir: Path, config: str | None = None) -> list[str]:
    """The gate trainer's command line: the flags a user would type (see `mole train --help`)."""
    cmd = [sys.executable, "-m", "moslora_diffusion.mole", "train", "--pretrained_model_name_or_path", str(base),
           "--experts", *map(str, files), "--expert_data_dirs", *map(str, photo_dirs),
           "--expert_prompts", *(p.strip() for p in settings.prompts),
           "--max_train_steps", str(settings.steps), "--learning_rate", str(settings.learning_rate),
           "--balance_weight", str(settings.balance_weight), "--output_dir", str(output_dir),
           "--logging_steps", str(max(1, settings.steps // 200)), "--report_to", "none"]
    if settings.resolution:
        cmd += ["--resolution", str(settings.resolution)]
    if config:
        cmd += ["--single_file_config", str(config)]
    return cmd


def start_gate_training(state, settings: GateSettings) -> TrainingJob:
    """Checks everything (names, numbers, photo folders by content), then starts the gate trainer in
    outputs/mole/<time>-<experts>/; the Compose tab loads its mole.safetensors when it finishes."""
    settings.check()
    loaded = state.loaded_adapters()
    unknown = [name for name in settings.experts if name not in loaded]
    if unknown:
        raise TrainingError(f"no adapter loaded named {', '.join(unknown)}")
    if len(set(settings.experts)) != len(settings.experts):
        raise TrainingError("an adapter is chosen twice; choose each expert once")
    files = [loaded[name] for name in settings.experts]
    folders = check_photo_dirs(settings, files, state.photo_roots, state.outputs)
    state.training.check_free()
    output_dir = new_run_dir(state.outputs / "mole", "+".join(settings.experts))
    cmd = build_gate_command(state.base, files, folders, settings, output_dir, state.config)
    return state.training.launch(cmd, output_dir, FILE_NAME, kind="gates")


def register_finished_gates(state) -> str | None:
    """Loads the MoLE file of the finished gate run into the Compose tab (once); returns its name (None: no
    such run)."""
    job = state.training.job
    return None if job is None else job.register("gates", lambda j: state.compose.load(j.result_path))
