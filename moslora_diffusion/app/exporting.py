"""The Export tab's work: the chosen adapters at the chosen scales, as files other tools load.

Goes through `moslora_diffusion.formats.export_targets.export` (the same code as the `moslora-export` command), so the
app's downloads are exactly what the command line writes.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from ..checks import SCALE, check_number
from .state import AppState

EXPORT_TARGETS = {
    "kohya LoRA (A1111 / ComfyUI)": "lora-kohya",
    "merged single-file checkpoint (.safetensors)": "merged-single-file",
}
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


class AppExportError(ValueError):
    """Nothing to export, or an unknown choice."""


def export_adapters(state: AppState, target: str, scales: dict[str, float], dtype: str = "fp16") -> Path:
    """Writes outputs/exports/<time>-<adapters>-<target>.safetensors and returns it."""
    from ..formats.export_targets import export

    if target not in EXPORT_TARGETS.values():
        raise AppExportError(f"unknown export target {target!r}")
    if dtype not in EXPORT_DTYPES:
        raise AppExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    scales = {name: check_number(f"scale of {name!r}", value, SCALE, AppExportError) for name, value in scales.items()}
    loaded = state.loaded_adapters()
    unknown = sorted(set(scales) - set(loaded))
    if unknown:
        raise AppExportError(f"no adapter loaded named {', '.join(unknown)}")
    chosen = [(loaded[name], scale) for name, scale in scales.items() if scale != 0.0]
    if not chosen:
        raise AppExportError("choose at least one adapter with a scale other than 0 to export")
    names = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", name) for name, s in scales.items() if s != 0.0)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = state.outputs / "exports" / f"{stamp}-{names[:60]}-{target}.safetensors"
    return export(state.base, chosen, target, out, dtype=dtype, overwrite=False, config=state.config)
