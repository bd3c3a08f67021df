"""Training from the app: the project's own trainers (DreamBooth, MoLE gates) in a background process group.

The app never trains in its own process: a crash or an out-of-memory kill of the trainer must not take
the web server down, and cancelling must stop every process the trainer started (its process group).
Progress comes from `<output_dir>/progress.jsonl` when the trainer writes one, otherwise from the tqdm
bar it prints (step/total and `loss=` in the postfix); validation images from `<output_dir>/validation/`.
A watcher thread per job calls the manager's `on_finished` when the trainer exits, so the app loads a
finished run whether or not a page is open to poll it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from ..checks import Range, number_problems
from ..evaluation.toy_scorer import size_problem
from ..training.settings.config import PRIOR_SOURCES, VALIDATION_METRICS
from ..training.settings.flags import ConfigError
from ..training.settings.presets import preset_names
from ..training.settings.trigger_word import check_pivotal_flags
from .paths import ADAPTER_FILE_NAME
from .trigger_words import guess_trigger_word

# The app always says which source (its radio), so "auto" is not offered.
APP_PRIOR_SOURCES = tuple(source for source in PRIOR_SOURCES if source != "auto")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder `moslora_diffusion` is imported from
TRAINER = PACKAGE_PARENT / "train_dreambooth.py"
PROGRESS_FILE = "progress.jsonl"
VALIDATION_DIR = "validation"
MAX_TRAIN_STEPS = 20_000
MAX_RANK = 256
_STEP = re.compile(r"(\d+)/(\d+) \[")
log = logging.getLogger("moslora_diffusion.app")
_LOSS = re.compile(r"loss[=:]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


class TrainingError(ValueError):
    """Bad training settings, or a job that cannot be started."""


# The numbers a training request takes, with where they may lie (checked in one place, TrainingSettings.check).
SETTINGS_RANGES = {
    "steps": Range(1, MAX_TRAIN_STEPS, integer=True),
    "rank": Range(1, MAX_RANK, integer=True),
    "resolution": Range(64, 2048, integer=True, multiple_of=8, optional=True),
    "validation_steps": Range(0, MAX_TRAIN_STEPS, integer=True, label="validation every N steps"),
    "learning_rate": Range(0, 1, open_lower=True, optional=True, label="learning rate"),
    "validation_loss_photos": Range(0, 100, integer=True, label="held-out photos"),
}


@dataclass
class TrainingSettings:
    instance_dir: Path
    instance_prompt: str
    class_prompt: str = ""  # given: prior preservation (how: prior_source)
    steps: int = 400
    rank: int = 4
    resolution: int | None = None  # None: the model family's
    validation_steps: int = 100  # 0: no validation images
    learning_rate: float | None = None  # None: the preset's, else the trainer's default for its optimizer
    validation_prompt: str = ""  # empty: the instance prompt
    validation_metrics: str = "none"  # scores of every validation (--validation_metrics): none, toy, dreambench
    validation_loss_photos: int = 0  # photos set aside for the held-out validation loss (0: none)
    # With a class prompt: "class_images" (generated into <run>-class-images) or "base_model" (the base model's own
    # prediction is the prior target, no class images: --prior_source base_model). Unused without a class prompt.
    prior_source: str = "class_images"
    pivotal: bool = False  # pivotal tuning: also learn the trigger word's embedding (--train_text_encoder_ti)
    trigger_word: str = ""  # pivotal tuning's word (--token_abstraction); empty: guessed (trigger_words.py)
    masked_loss: bool = False  # weight the loss by each photo's <name>_mask.png or alpha channel (--masked_loss)
    preset: str = ""  # a training preset (--preset; training/settings/presets/), under the settings above; empty: none

    def check(self) -> None:
        """Raises TrainingError naming every problem; on success the numbers are ints (floats for the rate) and
        trigger_word is the word pivotal tuning will train."""
        problems = [] if self.instance_prompt.strip() else [
            "enter an instance prompt with a trigger word, e.g. 'a photo of sks dog'"]
        numbers = {name: getattr(self, name) for name in SETTINGS_RANGES}
        problems += number_problems(numbers, SETTINGS_RANGES)
        if self.validation_metrics not in VALIDATION_METRICS:
            problems.append(f"validation scores must be one of {list(VALIDATION_METRICS)}, got "
                            f"{self.validation_metrics!r}")
        elif self.validation_metrics != "none" and not problems and not int(self.validation_steps):
            problems.append("validation scores rate the validation images: set 'validation every N steps' above 0")
        elif self.validation_metrics == "toy" and not problems and size_problem(self.resolution, "resolution"):
            problems.append(size_problem(self.resolution, "resolution"))
        if not problems and int(self.validation_loss_photos) and not int(self.validation_steps):
            problems.append("the held-out loss is scored at every validation: set 'validation every N steps' above 0")
        if self.prior_source not in APP_PRIOR_SOURCES:
            problems.append(f"prior preservation source must be one of {list(APP_PRIOR_SOURCES)}, got "
                            f"{self.prior_source!r}")
        if self.pivotal and self.instance_prompt.strip():
            problems += self._trigger_word_problems()
        if self.preset and self.preset not in preset_names():
            problems.append(f"unknown preset {self.preset!r}; choose one of {', '.join(preset_names())}")
        if problems:
            raise TrainingError("; ".join(problems))
        for name, value in numbers.items():
            setattr(self, name, SETTINGS_RANGES[name].clean(value))

    def _trigger_word_problems(self) -> list[str]:
        """Resolves trigger_word (typed, else guessed) and checks it with the trainer's own check."""
        self.trigger_word = self.trigger_word.strip() or guess_trigger_word(self.instance_prompt, self.class_prompt)
        if not self.trigger_word:
            return ["pivotal tuning needs the trigger word: type the rare word of the instance prompt, e.g. sks"]
        flags = SimpleNamespace(train_text_encoder_ti=True, token_abstraction=self.trigger_word, embedding_lr=None,
                                instance_prompt=self.instance_prompt.strip())
        try:
            check_pivotal_flags(flags)
        except ConfigError as err:
            return [str(err)]
        return []


def build_command(base: str, settings: TrainingSettings, output_dir: Path, config: str | None = None,
                  trainer: Path = TRAINER) -> list[str]:
    """The trainer's command line; the same flags a user would type (diffusers' names). `settings` checked first
    (check() resolves the pivotal-tuning trigger word)."""
    cmd = [sys.executable, str(trainer), "--pretrained_model_name_or_path", str(base),
           "--instance_data_dir", str(settings.instance_dir), "--instance_prompt", settings.instance_prompt.strip(),
           "--max_train_steps", str(int(settings.steps)), "--rank", str(int(settings.rank)),
           "--output_dir", str(output_dir),
           # ~200 loss points for the curve; each costs the trainer one device sync, so not every step
           "--logging_steps", str(max(1, int(settings.steps) // 200))]
    if settings.learning_rate is not None:
        cmd += ["--learning_rate", str(settings.learning_rate)]
    if settings.preset:  # the boxes' values go on top; what they turn off is said explicitly (the preset may turn
        # it on): an empty class prompt means no prior preservation, as the box says
        cmd += ["--preset", settings.preset]
        cmd += [] if settings.class_prompt.strip() else ["--no-with_prior_preservation"]
        cmd += [] if settings.pivotal else ["--no-train_text_encoder_ti"]
        cmd += [] if settings.masked_loss else ["--no-masked_loss"]
    if settings.class_prompt.strip():
        cmd += ["--with_prior_preservation", "--class_prompt", settings.class_prompt.strip()]
        if settings.prior_source == "base_model":
            cmd += ["--prior_source", "base_model"]
        else:
            cmd += ["--class_data_dir", str(output_dir.parent / f"{output_dir.name}-class-images")]
    if settings.pivotal:
        cmd += ["--train_text_encoder_ti", "--token_abstraction", settings.trigger_word.strip()]
    if settings.masked_loss:
        cmd.append("--masked_loss")
    if settings.resolution:
        cmd += ["--resolution", str(int(settings.resolution))]
    if settings.validation_steps:
        prompt = settings.validation_prompt.strip() or settings.instance_prompt.strip()
        cmd += ["--validation_prompt", prompt, "--validation_steps", str(int(settings.validation_steps)),
                "--num_validation_images", "2"]
        if settings.validation_metrics != "none":
            cmd += ["--validation_metrics", settings.validation_metrics]
        if settings.validation_loss_photos:
            cmd += ["--validation_loss_photos", str(int(settings.validation_loss_photos))]
    if config:
        cmd += ["--single_file_config", str(config)]
    return cmd


@dataclass
class JobProgress:
    state: str  # running, finished, failed, cancelled
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    message: str = ""
    scores: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # --validation_metrics, per step
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out validation loss)


def parse_log(text: str) -> tuple[int, int, list[tuple[int, float]], str]:
    """(step, total, [(step, loss)], last line) from tqdm output (updates separated by \\r or \\n)."""
    step = total = 0
    losses: dict[int, float] = {}
    last = ""
    for segment in re.split(r"[\r\n]+", text):
        segment = segment.strip()
        if not segment:
            continue
        last = segment
        match = _STEP.search(segment)
        if match and "class" not in segment:  # the class-image generation bar is not training
            step, total = int(match.group(1)), int(match.group(2))
            loss = _LOSS.search(segment)
            if loss and step:
                losses[step] = float(loss.group(1))
    return step, total, sorted(losses.items()), last


def read_progress_file(path: Path) -> JobProgress:
    """Progress (state "running") from progress.jsonl lines {"step", "total", "loss"} and the validation records
    {"step", "validation_images"?, "scores"?: {metric: value}, "val_loss"?}."""
    progress = JobProgress("running")
    losses, scores, held_out = {}, {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        step = int(record.get("step", progress.step))
        progress.step, progress.total = step, int(record.get("total", progress.total))
        if record.get("loss") is not None:
            losses[step] = float(record["loss"])
        if isinstance(record.get("scores"), dict):
            scores[step] = {name: float(value) for name, value in record["scores"].items()}
        if record.get("val_loss") is not None:
            held_out[step] = float(record["val_loss"])
        progress.validation_images += [path.parent / p for p in record.get("validation_images", [])]
    progress.losses, progress.scores, progress.held_out = (sorted(losses.items()), sorted(scores.items()),
                                                           sorted(held_out.items()))
    return progress


class TrainingJob:
    """One trainer process: started in its own session (process group), polled, cancellable.

    kind: "dreambooth" (its result is moslora.safetensors) or "gates" (MoLE gate training: mole.safetensors);
    the job has finished when the process exited 0 and left `result_name` in its output folder.
    on_exit(job), when given, is called from a watcher thread once the process has exited (any state)."""

    def __init__(self, cmd: list[str], output_dir: Path, log_path: Path, result_name: str = ADAPTER_FILE_NAME,
                 kind: str = "dreambooth", on_exit: Callable[[TrainingJob], object] | None = None):
        self.cmd, self.output_dir, self.log_path = cmd, Path(output_dir), Path(log_path)
        self.result_name, self.kind, self.on_exit = result_name, kind, on_exit
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self.registered_as: str | None = None  # the adapter name once the app loaded the result
        self.notes: list[str] = []  # what the user should know about the photos (skipped, downscaled, small)
        self.started_at = 0.0
        self._register_lock = threading.Lock()  # the watcher thread and a page's poll may both load the result

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A live stream the trainer writes and the Train tab reads as it grows, so not files/atomic.py; each
        # run gets a new log name (new_run_dir), so no earlier file is ever truncated.
        # `python -m moslora_diffusion...` must import this very copy of the package, installed or not.
        path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
        self.started_at = time.time()
        if self.on_exit is not None:
            threading.Thread(target=self._watch, name=f"watch-{self.output_dir.name}", daemon=True).start()

    def _watch(self) -> None:
        self.process.wait()
        try:
            self.on_exit(self)
        except Exception as err:  # a page's poll retries and shows it; the server thread must not die of it
            log.warning("the finished run %s could not be loaded: %s", self.output_dir, err)

    def register(self, kind: str, load: Callable[[TrainingJob], str]) -> str | None:
        """Loads the result of a finished job of this kind once, with `load(job)` -> name; returns the name
        (also on later calls), None while running or when cancelled, failed or of another kind."""
        if self.kind != kind:
            return None
        with self._register_lock:
            if self.registered_as is None and self.state() == "finished":
                self.registered_as = load(self)
            return self.registered_as

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def result_path(self) -> Path:
        """What a successful run leaves: the adapter (DreamBooth) or the MoLE file (gates)."""
        return self.output_dir / self.result_name

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the whole group, SIGKILL if it has not exited after grace_s."""
        if not self.running:
            return
        self.cancelled = True
        pgid = self.process.pid  # start_new_session: the trainer leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def progress(self) -> JobProgress:
        log = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        step, total, losses, last = parse_log(log)
        images = sorted((self.output_dir / VALIDATION_DIR).glob("*.png"))
        scores, held_out = [], []
        if (self.output_dir / PROGRESS_FILE).exists():
            read = read_progress_file(self.output_dir / PROGRESS_FILE)
            step, total, losses, scores, held_out = read.step, read.total, read.losses, read.scores, read.held_out
            images = read.validation_images or images
        state = self.state()
        message = {"running": last, "cancelled": "cancelled"}.get(state, "")
        if state == "failed":
            message = f"trainer exited with code {self.process.returncode}: " + "\n".join(log.splitlines()[-8:])
        elif state == "finished":
            message = f"finished: {self.result_path}"
        return JobProgress(state, step, total, losses, images, message, scores, held_out)

    def state(self) -> str:
        if self.running:
            return "running"
        if self.cancelled:
            return "cancelled"
        if self.process.returncode == 0 and self.result_path.is_file():
            return "finished"
        return "failed"


def new_run_dir(runs_dir: Path, prompt: str) -> Path:
    """<runs_dir>/<time>-<prompt words>: readable, unique, and never a user-chosen path."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "subject"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = runs_dir / f"{stamp}-{slug}"
    n = 2
    while folder.exists():
        folder = runs_dir / f"{stamp}-{slug}-{n}"
        n += 1
    return folder


class TrainingManager:
    """At most one training job at a time (one accelerator, one trainer), DreamBooth or MoLE gates."""

    def __init__(self, runs_dir: Path, trainer: Path = TRAINER,
                 on_finished: Callable[[TrainingJob], object] | None = None):
        """on_finished(job): called when a job's trainer exits, from its watcher thread (the app loads the result)."""
        self.runs_dir, self.trainer, self.on_finished = Path(runs_dir), Path(trainer), on_finished
        self.job: TrainingJob | None = None

    def start(self, base: str, settings: TrainingSettings, config: str | None = None) -> TrainingJob:
        settings.check()
        self.check_free()
        if not self.trainer.is_file():
            raise TrainingError(f"the trainer {self.trainer} is missing")
        output_dir = new_run_dir(self.runs_dir, settings.instance_prompt)
        return self.launch(build_command(base, settings, output_dir, config, self.trainer), output_dir)

    def check_free(self) -> None:
        if self.job is not None and self.job.running:
            raise TrainingError(f"a training run ({self.job.kind}) is already in progress; cancel it or wait for it "
                                "to finish")

    def launch(self, cmd: list[str], output_dir: Path, result_name: str = ADAPTER_FILE_NAME,
               kind: str = "dreambooth") -> TrainingJob:
        """Starts any trainer command that writes `output_dir` (progress.jsonl, `result_name`); its log goes to
        <output_dir's parent>/logs/<run>.log."""
        self.check_free()
        job = TrainingJob(cmd, output_dir, output_dir.parent / "logs" / f"{output_dir.name}.log", result_name, kind,
                          self.on_finished)
        job.start()
        self.job = job
        return job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def shutdown(self) -> None:
        """Called when the app exits: an orphaned trainer would hold the accelerator."""
        self.cancel()
