"""The Export tab's work: the chosen adapters at the chosen scales, or a MoLE composition, as files other tools load.

Goes through `moslora_diffusion.formats.export_targets.export` (the same code as the `moslora-export` command) and
`mole.export_static` (as `mole export`), so the app's downloads are exactly what the command line writes; every
file lands under outputs/exports/ with a new name, written atomically by those writers.
"""

from __future__ import annotations

import itertools
import re
import zipfile
from datetime import datetime
from pathlib import Path

from ..checks import SCALE, check_number
from ..files.atomic import atomic_write
from ..formats.ui_files import UiFile, adapter_words, describe, export_files
from ..generation.text_to_image import MoLESettings
from .state import AppState

EXPORT_TARGETS = {
    "kohya LoRA (A1111 / ComfyUI)": "lora-kohya",
    "merged single-file checkpoint (.safetensors)": "merged-single-file",
}
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


class AppExportError(ValueError):
    """Nothing to export, or an unknown choice."""


def _check_choices(target: str, dtype: str) -> None:
    if target not in EXPORT_TARGETS.values():
        raise AppExportError(f"unknown export target {target!r}")
    if dtype not in EXPORT_DTYPES:
        raise AppExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")


def _export_path(state: AppState, names: list[str], target: str) -> Path:
    """outputs/exports/<time>-<names>-<target>/<time>-<names>-<target>.safetensors: never a user-chosen path; each
    export its own folder, so the files written beside a LoRA (a trigger word's `<word>.safetensors`) of one
    export never meet another's."""
    slug = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", name) for name in names)
    first = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{slug[:60]}-{target}"
    exports = state.outputs / "exports"
    # two exports in the same second get -2, -3...: exports run one at a time (the Export tab's queue)
    for stem in (first + (f"-{n}" if n > 1 else "") for n in itertools.count(1)):
        if not (exports / stem).exists() and not (exports / f"{stem}.zip").exists():
            return exports / stem / f"{stem}.safetensors"
    raise AssertionError("unreachable: itertools.count never ends")


def download(target: str, written: Path, words: list[str]) -> tuple[Path, list[UiFile]]:
    """(what the app offers to download, the files a UI needs): the export itself when it is the only file, else
    one zip of them all (`<export folder>.zip`) with a README.txt that says where each goes."""
    files = export_files(target, written, words)
    if len(files) == 1:
        return written, files
    folder = written.parent

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:  # safetensors barely compress
            for f in files:
                archive.write(f.path, f.path.name)
            archive.writestr("README.txt", describe(files, relative_to=folder) + "\n")

    return atomic_write(folder.with_suffix(".zip"), write, overwrite=False), files


def export_adapters(state: AppState, target: str, scales: dict[str, float], dtype: str = "fp16") -> Path:
    """Writes outputs/exports/<time>-<adapters>-<target>/<time>-<adapters>-<target>.safetensors (and, for a LoRA of
    an adapter trained with pivotal tuning, the trigger word's <word>.safetensors beside it) and returns the first."""
    from ..formats.export_targets import export

    _check_choices(target, dtype)
    scales = {name: check_number(f"scale of {name!r}", value, SCALE, AppExportError) for name, value in scales.items()}
    loaded = state.loaded_adapters()
    unknown = sorted(set(scales) - set(loaded))
    if unknown:
        raise AppExportError(f"no adapter loaded named {', '.join(unknown)}")
    chosen = [(loaded[name], scale) for name, scale in scales.items() if scale != 0.0]
    if not chosen:
        raise AppExportError("choose at least one adapter with a scale other than 0 to export")
    out = _export_path(state, [name for name, s in scales.items() if s != 0.0], target)
    return export(state.base, chosen, target, out, dtype=dtype, overwrite=False, config=state.config)


def export_for_download(state: AppState, target: str, scales: dict[str, float], dtype: str = "fp16"
                        ) -> tuple[Path, list[UiFile]]:
    """export_adapters, then download(): (the file or zip the app offers, the files a UI needs to draw the subject)."""
    path = export_adapters(state, target, scales, dtype)
    loaded = state.loaded_adapters()
    chosen = [(loaded[name], scale) for name, scale in scales.items() if scale != 0.0]
    return download(target, path, adapter_words(chosen) if target.startswith("lora-") else [])


def export_mole(state: AppState, settings: MoLESettings, target: str, dtype: str = "fp16",
                prompts: list[str] | None = None) -> Path:
    """The static MoLE export (mole.average_gates + mole.export_static, as `mole export`) of a loaded MoLE file
    with its mask and extra scales: gates averaged per block over `prompts` (default: the experts' trigger
    prompts) on the app's pipeline in MoLE mode, then folded exactly into one kohya LoRA, or merged into a fresh
    copy of the base model (the app's own weights are never baked). Returns the written file."""
    from ..models.loading import load_pipeline
    from ..mole import attach_mole, average_gates, export_static
    from ..mole.inference import configure

    _check_choices(target, dtype)
    settings = state.compose.check(settings)
    prompts = [p.strip() for p in prompts or [] if p.strip()] or None
    out = _export_path(state, ["mole", settings.file], target)
    with state.compose.active(settings) as mole:
        weights = average_gates(state.pipe, prompts, seeds=(0, 1))
        if target == "lora-kohya":
            return export_static(state.pipe, weights, target, out, dtype, base=state.base)
        experts, gates = mole.experts, mole.gate_state()
    pipe = load_pipeline(state.base, config=state.config)  # fp32 on the CPU, as the export command
    configure(attach_mole(pipe, experts, gates), settings.masked, settings.scales)
    return export_static(pipe, weights, target, out, dtype, base=state.base)
