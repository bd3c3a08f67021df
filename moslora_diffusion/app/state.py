"""What the running app holds: one pipeline (loaded once), its fused adapters, the allowed folders.

The UI calls only these methods, so every feature also works (and is tested) without a browser.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files.atomic import check_output_folder
from ..files.safetensors_io import read_keys
from ..formats.merge import given_twice
from ..generation.fusion import FusedAdapters
from ..generation.text_to_image import (
    GeneratedImage,
    GenerationRequest,
    generate,
    native_size,
    save_png,
    scheduler_label,
)
from ..models.families import detect_model
from ..models.loading import load_pipeline
from ..moslora.inject import AdapterError
from ..moslora.native_file import not_an_adapter
from ..training.settings.presets import preset_for_model
from .compose import Compositions
from .gate_jobs import register_finished_gates
from .layout import LayoutRunner
from .paths import AllowedRoots, adapter_file, adapter_name, discover_adapters, unique_name
from .training_jobs import TrainingJob, TrainingManager, TrainingSettings, new_run_dir
from .uploads import UploadError, check_photo_folder, check_photo_masks, photo_folders, photo_notes, stage_uploads

log = logging.getLogger("moslora_diffusion.app")
GATE_RUNS = "mole"  # outputs/mole/<run>/mole.safetensors: gates trained from the app
MODEL_LOADS = {"count": 0}  # process-wide: proves a slider move never reloads the model


def load_base_pipeline(source: str | Path, config: str | Path | None = None, device: str | None = None):
    """The base pipeline on `device` (fp16 on CUDA, fp32 on CPU); counted in MODEL_LOADS."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(source, torch_dtype=dtype, config=config).to(device)
    pipe.set_progress_bar_config(disable=True)
    MODEL_LOADS["count"] += 1
    log.info("model loaded: %s (load #%d, pipeline id %x)", source, MODEL_LOADS["count"], id(pipe))
    return pipe


def display_name(source: str | Path) -> str:
    """A hub id as is, a local model by its folder or file name (no private paths in PNG metadata)."""
    path = Path(str(source))
    return path.name if path.exists() else str(source)


def _markdown(text: str) -> str:
    """User text shown as itself in Markdown (a `*` or `_` in a prompt is no emphasis)."""
    return "".join(f"\\{c}" if c in "\\`*_[]<>#|" else c for c in text)


@dataclass
class Saved:
    path: Path
    infotext: str
    label: str


class AppState:
    def __init__(self, pipe, base: str | Path, outputs_dir: str | Path, roots: AllowedRoots | None = None,
                 config: str | Path | None = None, photo_roots: AllowedRoots | None = None,
                 mole_roots: AllowedRoots | None = None):
        self.pipe, self.base, self.config = pipe, str(base), str(config) if config else None
        self.model_name = display_name(base)
        self.info = detect_model(pipe)
        self.default_size = native_size(pipe, self.info.default_resolution)
        self.fusion = FusedAdapters(pipe)
        self.scheduler_config = pipe.scheduler.config  # every scheduler swap starts from the model's own
        self.default_scheduler = scheduler_label(pipe.scheduler)
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.images = self.outputs / "images"  # PNGs by date; `generate --out D` puts them in D itself
        # outputs/training and outputs/mole are made by the first job that writes there: `generate --out D`, which
        # builds this state too, must leave nothing in D but its images.
        self.roots = roots or AllowedRoots()
        self.roots.add(self.outputs / "training")  # adapters trained from the app land here
        self.photo_roots = photo_roots or AllowedRoots()
        self.training = TrainingManager(self.outputs / "training", on_finished=self.load_finished_run)
        # MoLE files: the --mole paths, the adapters' folders, and the gates trained from the app (outputs/mole).
        self.mole_roots = mole_roots or AllowedRoots()
        for root in [*self.roots.roots, self.outputs / GATE_RUNS]:
            self.mole_roots.add(root)
        self.compose = Compositions(pipe, self.fusion, self.mole_roots)
        self.layout = LayoutRunner(self)  # the Compose tab's regions per expert (layout.py)
        self.generations = 0
        self.last_seconds = 0.0
        self._paths: dict[str, Path] = {}  # loaded adapter name -> file
        self._adapters_lock = threading.Lock()  # a UI load and a finished training run may race

    # adapters
    def available_adapters(self) -> dict[str, Path]:
        return discover_adapters(self.roots)

    def load_adapter(self, path: str | Path, scale: float = 1.0) -> str:
        """Loads an adapter file from an allowed folder; returns its name (the slider label)."""
        file = adapter_file(path, self.roots)
        with self._adapters_lock:
            for name, loaded in self._paths.items():
                if loaded == file:
                    return name
            name = unique_name(adapter_name(file), self._paths)
            self.fusion.add(name, file, scale)
            self._paths[name] = file
        log.info("adapter %s loaded from %s at scale %g", name, file, scale)
        return name

    def load_available(self, name: str, scale: float = 1.0) -> str:
        """Loads an adapter by its name in available_adapters() (what the UI and API offer)."""
        available = self.available_adapters()
        if not (name or "").strip():
            raise AdapterError(f"choose an adapter to load; in the app's folders: {', '.join(available) or 'none'}")
        if name not in available:
            raise AdapterError(f"no adapter named {name!r} in the app's folders; choose one of: "
                               f"{', '.join(available) or 'none'}")
        return self.load_adapter(available[name], scale)

    def unload_adapter(self, name: str) -> None:
        with self._adapters_lock:
            self.fusion.remove(name)
            self._paths.pop(name)

    def loaded_adapters(self) -> dict[str, Path]:
        return dict(self._paths)

    # generation
    def generate(self, request: GenerationRequest, progress=None) -> list[Saved]:
        start = time.perf_counter()
        images = generate(self.pipe, self.fusion, request, self.model_name, self.scheduler_config, progress)
        return self.save_generated(images, start)

    def save_generated(self, images: list[GeneratedImage], start: float) -> list[Saved]:
        """The PNGs of one request (with their parameters text) under `images` (outputs/images); counts the request."""
        saved = [Saved(save_png(item, self.images), item.infotext, item.label) for item in images]
        self.generations += 1
        self.last_seconds = time.perf_counter() - start
        return saved

    def trigger_prompts(self) -> dict[str, str]:
        """Loaded adapter -> its trigger prompt (the instance prompt it was trained with; "" when not recorded)."""
        return {name: str(adapter.info.get("instance_prompt") or "") for name, adapter in self.fusion.adapters.items()}

    @property
    def matching_preset(self) -> str | None:
        """The training preset of this base model (the toy base: toy-subject; SDXL: sdxl-subject; ...)."""
        return preset_for_model(self.base, self.info.family.name)

    def suggested_prompt(self) -> str:
        """The first loaded adapter's trigger prompt: what the prompt box starts with."""
        return next((prompt for prompt in self.trigger_prompts().values() if prompt), "")

    def status(self) -> dict:
        """For monitoring over the API (`/status`): also the internals the header leaves out."""
        return {"model": self.model_name, "family": self.info.family.name, "model_loads": MODEL_LOADS["count"],
                "pipeline_id": f"{id(self.pipe):x}", "generations": self.generations,
                "last_seconds": round(self.last_seconds, 3), "adapters": dict(self.fusion.scales),
                "trigger_prompts": self.trigger_prompts(), "moles": list(self.compose.moles)}

    def status_text(self) -> str:
        """The header a user reads: the base model, and each adapter with its trigger prompt and scale."""
        head = f"Base model **{_markdown(self.model_name)}** ({self.info.family.label})"
        triggers = self.trigger_prompts()
        if not triggers:
            return f"{head} · no adapter loaded: load one under *Adapters* or train one on the *Train* tab"
        described = []
        for name, prompt in triggers.items():
            trigger = f"trigger “{_markdown(prompt)}”" if prompt else "no trigger prompt recorded"
            described.append(f"**{_markdown(name)}** ({trigger}, scale {self.fusion.scales[name]:g})")
        return f"{head} · adapters: " + ", ".join(described)

    # training
    def start_training(self, instance_prompt: str, class_prompt: str = "", steps: int = 400, rank: int = 4,
                       resolution: int | None = None, validation_steps: int = 100, folder: str | None = None,
                       uploads: list | None = None, validation_prompt: str = "",
                       validation_metrics: str = "none", validation_loss_photos: int = 0,
                       prior_source: str = "class_images", pivotal: bool = False, trigger_word: str = "",
                       masked_loss: bool = False, preset: str = "") -> TrainingJob:
        """Starts the trainer on uploaded photos (checked, then copied) or a photo folder given to the app.
        validation_metrics: none, toy (the toy base only) or dreambench, scored on every validation's images;
        validation_loss_photos: photos set aside for the held-out loss (the trainer refuses leaving fewer than 2);
        prior_source (with a class prompt): class_images or base_model; pivotal: pivotal tuning of trigger_word
        (empty: guessed from the prompts); masked_loss: every photo needs its mask, checked before the job starts;
        preset: a training preset under these settings ("none" or empty: none)."""
        settings = TrainingSettings(Path("."), instance_prompt or "", class_prompt or "", steps, rank,
                                    resolution or None, validation_steps or 0,
                                    validation_prompt=validation_prompt or "",
                                    validation_metrics=validation_metrics or "none",
                                    validation_loss_photos=validation_loss_photos or 0,
                                    prior_source=prior_source or "class_images", pivotal=bool(pivotal),
                                    trigger_word=trigger_word or "", masked_loss=bool(masked_loss),
                                    preset="" if preset in (None, "none") else preset)
        settings.check()  # every number finite and in range, the trigger word in the prompt, before any copy
        settings.instance_dir, notes = self._training_photos(settings, folder, uploads)
        job = self.training.start(self.base, settings, self.config)
        job.notes = notes
        return job

    def _training_photos(self, settings: TrainingSettings, folder: str | None, uploads: list | None
                         ) -> tuple[Path, list[str]]:
        """(the photo folder the trainer reads, notes for the user); with the masked loss every photo's mask is
        checked here, and uploads staged for a refused run are removed again (our own folder)."""
        resolution = settings.resolution or self.default_size
        if uploads:
            staged = stage_uploads(uploads, new_run_dir(self.outputs / "uploads", settings.instance_prompt))
            if settings.masked_loss:
                try:
                    check_photo_masks(staged.folder, settings.instance_prompt, staged.uploaded_names())
                except UploadError:
                    shutil.rmtree(staged.folder)
                    raise
            return staged.folder, photo_notes(staged.photos, resolution)
        if not folder:
            raise UploadError("choose a photo folder or upload photos of the subject")
        folders = photo_folders(self.photo_roots)
        if folder not in folders:
            raise UploadError(f"unknown photo folder {folder!r}")
        instance_dir, found = check_photo_folder(folders[folder], self.photo_roots)
        if settings.masked_loss:
            check_photo_masks(instance_dir, settings.instance_prompt)
        notes = [f"{s.path.name}: skipped, {s.reason}" for s in found.skipped]
        return instance_dir, notes + photo_notes([(p.path.name, p) for p in found.photos], resolution)

    def register_finished_training(self) -> str | None:
        """Loads the adapter of the finished DreamBooth run (once); returns its name (None: no such run)."""
        job = self.training.job
        return None if job is None else job.register("dreambooth", lambda j: self.load_adapter(j.output_dir, 1.0))

    def load_finished_run(self, job: TrainingJob) -> str | None:
        """Called when a trainer exits (TrainingManager's watcher thread): loads what it trained, an adapter
        (slider on the Generate tab) or MoLE gates (Compose tab), whether or not a page is open."""
        if job is not self.training.job:
            return None
        name = self.register_finished_training() or register_finished_gates(self)
        if name:
            log.info("finished training run %s loaded as %s", job.output_dir, name)
        return name


def open_app_state(base: str | Path, outputs_dir: str | Path, adapters=(), config=None, photo_dirs=(),
                   device: str | None = None, moles=(), scales=()) -> AppState:
    """Loads the base model once, every --adapter (at its scale in `scales`, else 1.0) and every --mole file (each
    must load: a bad one stops the start-up)."""
    roots, mole_roots = AllowedRoots(), AllowedRoots()
    for flag, paths, allowed in (("--adapter", adapters, roots), ("--mole", moles, mole_roots)):
        for path in paths:
            if not Path(path).expanduser().exists():
                raise AdapterError(f"{flag} {path}: no such file or folder")
            allowed.add(path)
    photos = AllowedRoots()
    for folder in photo_dirs:
        photos.add(folder)
    check_output_folder(outputs_dir, "--output_dir")
    files = [adapter_file(path, roots) for path in adapters]
    twice = given_twice(files)
    if twice:  # it loaded the model, then failed on "zip() argument 2 is longer than argument 1"
        raise AdapterError(f"--adapter {twice} is given twice; give each adapter once")
    for file in files:  # a folder without an adapter, or a damaged file or a checkpoint, named before loading
        problem = not_an_adapter(file, read_keys(file))
        if problem:
            raise AdapterError(problem)
    pipe = load_base_pipeline(base, config, device)
    state = AppState(pipe, base, outputs_dir, roots, config, photos, mole_roots)
    for path, scale in zip(adapters, [*scales, *[1.0] * (len(adapters) - len(scales))], strict=False):
        state.load_adapter(path, scale=scale)
    for path in moles:
        state.compose.load(path)
    return state
