"""The Compose tab's work: subjects composed by weighted sum (the fused sliders) or by MoLE (learned gates).

The app's one pipeline serves both, and the two must never be active together: FusedAdapters writes
W0 + sum_i s_i delta_i into the weights, MoLE adds its experts through hooks on top of whatever the weights are.
So a MoLE file is attached once to read and check it, then detached; a MoLE generation (or export) holds the
fusion lock, sets every fused scale to 0 (W0 exactly), hooks the MoLE in (`mole.hooked`), runs, unhooks, and
writes the previous scales back from the kept W0 in fp32, which gives the same weights bit for bit. Every other
generation waits on that lock, so none ever sees the hooks or the zeroed scales.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ..files.safetensors_io import read_metadata
from ..generation.text_to_image import (
    GeneratedImage,
    GenerationError,
    GenerationRequest,
    MoLESettings,
    generate,
    make_scheduler,
    parse_infotext,
    validate_request,
)
from ..mole import FILE_NAME, MoLE, detach_mole, hooked, load_mole, render_gate_heatmap
from ..mole.inference import configure, generate_mole
from .paths import AllowedRoots, PathNotAllowedError, adapter_name, discover_adapters, unique_name

MODES = {"weighted sum": "sum", "MoLE (learned gates)": "mole", "compare: base | sum | MoLE": "compare"}
METADATA_KEY = "mole"  # what marks a safetensors file as a MoLE file (mole/file.py)


class ComposeError(ValueError):
    """A compose request the app refuses: unknown mode or MoLE file, a wrong expert name, every expert masked."""


@dataclass
class GateReport:
    """The gate weights of the latest MoLE generation: {block: [w_1 .. w_N]}, averaged over its steps."""

    mole: str
    experts: list[str]
    prompt: str
    weights: dict[str, list[float]]


def is_mole_file(path: Path) -> bool:
    try:
        return METADATA_KEY in read_metadata(path)
    except (OSError, ValueError):
        return False


class Compositions:
    """The MoLE files loaded into the app (detached between uses) and the gate report of the last MoLE image."""

    def __init__(self, pipe, fusion, roots: AllowedRoots):
        self.pipe, self.fusion, self.roots = pipe, fusion, roots
        self.moles: dict[str, MoLE] = {}  # name -> its MoLE, built on `pipe`, hooks removed
        self.paths: dict[str, Path] = {}
        self.last_report: GateReport | None = None
        self._load_lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        """MoLE files in the allowed folders: <root>/mole.safetensors, <root>/*/mole.safetensors, given files."""
        return {name: path for name, path in discover_adapters(self.roots, FILE_NAME).items() if is_mole_file(path)}

    def load(self, path: str | Path) -> str:
        """Reads and checks a MoLE file inside the allowed folders (a folder means its mole.safetensors); returns
        its name. PathNotAllowedError / MoLEError (one line) leave the app as it was."""
        file = self.roots.check(path)
        if file.is_dir():
            file = self.roots.check(file / FILE_NAME)
        if file.suffix.lower() != ".safetensors" or not file.is_file():
            raise PathNotAllowedError(f"{path}: no MoLE file there (expected {FILE_NAME} or a .safetensors)")
        with self._load_lock:
            for name, loaded in self.paths.items():
                if loaded == file:
                    return name
            with self.fusion.locked():  # attached only to be built and checked, never seen by a generation
                load_mole(self.pipe, file)
                mole = detach_mole(self.pipe)
            name = unique_name(adapter_name(file, FILE_NAME), self.paths)
            self.moles[name], self.paths[name] = mole, file
        return name

    def load_available(self, name: str | None) -> str:
        """Loads the MoLE file of this name in available(); ComposeError naming the choices for none or another."""
        available = self.available()
        choices = ', '.join(available) or 'none (train gates first)'
        if not (name or "").strip():
            raise ComposeError(f"choose a MoLE file from the list, or give a path inside the app's folders "
                               f"(mole.safetensors or its folder); in the list: {choices}")
        if name not in available:
            raise ComposeError(f"no MoLE file named {name!r} in the app's folders; choose one of: {choices}")
        return self.load(available[name])

    def experts(self, name: str) -> list[str]:
        return self._mole(name).expert_names

    def _mole(self, name: str) -> MoLE:
        if name not in self.moles:
            raise ComposeError(f"no MoLE file {name!r} is loaded; load one under *MoLE files* (loaded: "
                               f"{', '.join(self.moles) or 'none'})")
        return self.moles[name]

    def check(self, settings: MoLESettings | None) -> MoLESettings:
        """The settings with every expert's scale (default 1); ComposeError naming what is wrong."""
        if settings is None or not settings.file:
            raise ComposeError("choose a MoLE file (load one, or train gates for two or more adapters)")
        names = self.experts(settings.file)
        unknown = sorted((set(settings.scales) | set(settings.masked)) - set(names))
        if unknown:
            raise ComposeError(f"no expert {', '.join(unknown)} in {settings.file}; its experts are "
                               f"{', '.join(names)}")
        if set(names) <= set(settings.masked):
            raise ComposeError("every expert is masked; keep at least one")
        return replace(settings, scales=dict.fromkeys(names, 1.0) | settings.scales,
                       masked=[n for n in names if n in settings.masked])

    @contextmanager
    def active(self, settings: MoLESettings) -> Iterator[MoLE]:
        """The pipeline in MoLE mode for a with block (see the module docstring): fused scales 0, the MoLE hooked
        in with the settings' mask and scales; afterwards the fused scales exactly as before."""
        mole = self._mole(settings.file)
        with self.fusion.locked():
            previous = dict(self.fusion.scales)
            self.fusion.set_scales(dict.fromkeys(previous, 0.0))
            try:
                with hooked(self.pipe, mole):
                    configure(mole, settings.masked, settings.scales)
                    yield mole
            finally:
                self.fusion.set_scales(previous)

    def generate(self, req: GenerationRequest, model_name: str, scheduler_config) -> list[GeneratedImage]:
        """MoLE images for a validated request (req.mole checked by `check`); keeps their gate report."""
        settings = req.mole
        with self.active(settings) as mole:
            self.pipe.scheduler = make_scheduler(req.scheduler, scheduler_config)
            images, report = generate_mole(self.pipe, mole, replace(req, scales={}, mole=None), model_name,
                                           settings.file)
        self.last_report = GateReport(settings.file, mole.expert_names, req.prompt, report)
        return images

    def heatmap(self) -> Image.Image:
        """Which expert each block chose for the last MoLE prompt (blocks x experts)."""
        report = self.last_report
        if report is None:
            raise ComposeError("no MoLE image yet: generate in MoLE or compare mode first")
        return render_gate_heatmap(report.weights, report.experts, f"{report.mole}: {report.prompt[:60]}")


def check_mode(mode: str) -> str:
    if mode not in MODES.values():
        raise ComposeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES.values())}")
    return mode


def compose_images(state, req: GenerationRequest, mode: str, progress=None) -> list[GeneratedImage]:
    """Images of one checked request: `sum` (the fused sliders, req.scales), `mole` (req.mole), or `compare`
    (base, sum and MoLE of each seed side by side, labelled so). Everything is checked before any image runs."""
    check_mode(mode)
    req = validate_request(req, state.fusion.names())  # a concrete seed: every mode shares it
    if mode != "sum":
        req.mole = state.compose.check(req.mole)
    items: list[GeneratedImage] = []
    if mode in ("sum", "compare"):
        summed = generate(state.pipe, state.fusion, replace(req, compare_with_base=mode == "compare"),
                          state.model_name, state.scheduler_config, progress)
        items += [replace(i, label="sum") if i.label == "adapted" else i for i in summed]
    if mode in ("mole", "compare"):
        items += state.compose.generate(req, state.model_name, state.scheduler_config)
    return sorted(items, key=lambda item: item.seed)  # stable: base, sum, MoLE of one seed together


def request_from_infotext(state, text: str) -> tuple[GenerationRequest, str]:
    """The request and mode a pasted `parameters` text describes; ComposeError when it cannot be reproduced here
    (its MoLE file is not loaded, or it names adapters that are not)."""
    try:
        req = parse_infotext(text)
    except (KeyError, ValueError):
        raise GenerationError("not a parameters text: paste the whole text (prompt, then Steps, Sampler, Seed, "
                              "Size...)") from None
    if req.mole is not None:
        state.compose.check(req.mole)
        return req, "mole"
    missing = sorted(set(req.scales) - set(state.fusion.names()))
    if missing:
        raise ComposeError(f"the text names adapters that are not loaded: {', '.join(missing)}")
    return req, "sum"


def generate_composed(state, req: GenerationRequest, mode: str, progress=None) -> list:
    """compose_images, saved as PNGs with their parameters text, counted like every app generation."""
    start = time.perf_counter()
    return state.save_generated(compose_images(state, req, mode, progress), start)
