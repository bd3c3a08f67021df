"""What every tab of the Gradio interface shares: refusals shown to the user, the adapter slider slots."""

from __future__ import annotations

import logging

import gradio as gr

from .state import AppState

log = logging.getLogger("moslora_diffusion.app")
MAX_SLOTS = 8  # adapter sliders; more adapters than this can be loaded but not given a slider
PROGRESS = gr.Progress()  # Gradio swaps in a per-request tracker for a parameter defaulting to one
# A handler is the boundary to the user: every failure becomes a visible message and the app keeps serving.
USER_ERRORS = Exception


def refuse(err: Exception) -> str:
    """A refusal as a toast and as the text of the tab's message box; unexpected errors are logged in full."""
    message = str(err) or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):  # ours subclass ValueError; anything else is unexpected
        log.error("handler failed", exc_info=err)
        message = f"{type(err).__name__}: {message}"
    else:
        log.warning("refused: %s", message)
    gr.Warning(message)
    return f"⚠️ {message}"


def slot_updates(state: AppState, with_values: bool = False, new: str | None = None) -> list:
    """One update per slider slot: label and visibility from the loaded adapters (in load order)."""
    names = state.fusion.names()[:MAX_SLOTS]
    updates = []
    for i in range(MAX_SLOTS):
        if i >= len(names):
            updates.append(gr.update(visible=False))
            continue
        update = {"visible": True, "label": f"{names[i]} scale"}
        if with_values or names[i] == new:
            update["value"] = state.fusion.scales[names[i]]
        updates.append(gr.update(**update))
    return updates


def slider_scales(state: AppState, values) -> dict[str, float]:
    """The Generate tab's slider values by adapter name."""
    return {name: float(v) for name, v in zip(state.fusion.names()[:MAX_SLOTS], values, strict=False)}
