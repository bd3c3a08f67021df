"""Shared by the app tests (adapters come from conftest.make_adapter)."""

from __future__ import annotations

from moslora_diffusion.app.paths import AllowedRoots
from moslora_diffusion.app.state import AppState, load_base_pipeline


def tiny_app_state(model_dir, tmp_path_factory) -> tuple[AppState, object]:
    """An AppState on a tiny model; adapters may be read only from the returned fresh `given` folder."""
    given = tmp_path_factory.mktemp("given")
    roots = AllowedRoots()
    roots.add(given)
    state = AppState(load_base_pipeline(model_dir, device="cpu"), model_dir, tmp_path_factory.mktemp("outputs"), roots)
    return state, given
