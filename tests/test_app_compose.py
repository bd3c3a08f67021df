"""The Compose tab without a browser: weighted sum and MoLE on the app's one pipeline, never both at once;
compare; pasted parameters reproduce a MoLE image; checked requests; the gate heat map; MoLE files only from the
allowed folders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from app_helpers import tiny_app_state
from diffusers import DiffusionPipeline
from mole_helpers import make_experts, same_state
from mole_helpers import state as weights_of
from PIL import Image

from moslora_diffusion.app.compose import ComposeError, generate_composed, request_from_infotext
from moslora_diffusion.app.paths import PathNotAllowedError
from moslora_diffusion.generation.text_to_image import GenerationError, GenerationRequest, MoLESettings
from moslora_diffusion.mole import MoLEError, attach_mole, load_experts, load_mole, save_mole
from moslora_diffusion.mole.inference import configure, generate_mole

PROMPT = "a photo of sks dog"


@torch.no_grad()
def _trained_like(mole, seed=3):
    """Gates as training might leave them: feature-dependent, far from uniform."""
    g = torch.Generator().manual_seed(seed)
    for gate in mole.gates:
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
        gate.log_temperature.fill_(-0.3)


def write_mole(model_dir, experts: list, out):
    """A MoLE file with non-uniform gates for `experts` on a fresh pipeline of `model_dir`."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    mole = attach_mole(pipe, load_experts(pipe, experts))
    _trained_like(mole)
    return save_mole(mole, out, str(model_dir))


def dog_cat_app(model_dir, tmp_path_factory):
    """An app state with the dog (scale 1) and cat (0.5) experts loaded and their MoLE file 'dog+cat' chosen."""
    state, given = tiny_app_state(model_dir, tmp_path_factory)
    experts = make_experts(model_dir, given, ("dog", "cat"))
    state.load_adapter(experts["dog"], 1.0)
    state.load_adapter(experts["cat"], 0.5)
    write_mole(model_dir, [experts["dog"], experts["cat"]], given / "dog+cat" / "mole.safetensors")
    assert state.compose.load_available("dog+cat") == "dog+cat"
    return state


@pytest.fixture(scope="module")
def app(tiny_sd15_dir, tmp_path_factory):
    return dog_cat_app(tiny_sd15_dir, tmp_path_factory)


def _request(seed=5, **kwargs) -> GenerationRequest:
    return GenerationRequest(PROMPT, "", seed, 2, 5.0, 64, 64, 1, "DDIM", **kwargs)


def _pixels(saved) -> list[np.ndarray]:
    return [np.asarray(Image.open(s.path)) for s in saved]


def test_a_mole_generation_leaves_sum_mode_bit_for_bit(app, tiny_sd15_dir):
    weights = weights_of(app.pipe)
    scales = {"dog": 1.0, "cat": 0.5}
    (before,) = _pixels(generate_composed(app, _request(scales=scales), "sum"))
    mole_settings = MoLESettings("dog+cat", {"dog": 1.3})
    (mole,) = _pixels(generate_composed(app, _request(mole=mole_settings), "mole"))
    (after,) = _pixels(generate_composed(app, _request(scales=scales), "sum"))
    assert np.array_equal(before, after) and same_state(weights, weights_of(app.pipe))
    assert app.fusion.scales == scales and not hasattr(app.pipe, "_moslora_mole")  # no hook left behind
    assert np.abs(mole.astype(int) - before.astype(int)).max() > 0  # a different image: the gates, not the sum

    # The app's MoLE image is exactly the MoLE file on a fresh copy of the base model (fused weights were at 0).
    fresh = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    fresh.set_progress_bar_config(disable=True)
    m = load_mole(fresh, app.compose.paths["dog+cat"])
    configure(m, [], {"dog": 1.3})
    (item,), _ = generate_mole(fresh, m, _request(), "tiny", "dog+cat")
    assert np.array_equal(np.asarray(item.image), mole)


def test_compare_shows_base_sum_and_mole_of_one_seed(app):
    saved = generate_composed(app, _request(seed=-1, scales={"dog": 1.0, "cat": 0.5},
                                            mole=MoLESettings("dog+cat", masked=["cat"])), "compare")
    assert [s.label for s in saved] == ["base", "sum", "mole"]
    seeds = {s.infotext.split("Seed: ")[1].split(",")[0] for s in saved}
    assert len(seeds) == 1  # one concrete seed for all three, picked once
    base, summed, mole = saved
    assert "Lora scales" in summed.infotext and "dog: 0" in base.infotext and "Lora scales" not in mole.infotext
    assert "MoLE: dog+cat" in mole.infotext and "MoLE mask: cat" in mole.infotext
    report = app.compose.last_report
    assert report.experts == ["dog", "cat"] and all(w[1] == 0.0 for w in report.weights.values())  # cat masked
    heatmap = app.compose.heatmap()
    assert heatmap.height > 18 * len(report.weights)  # one row per block


def test_pasted_parameters_reproduce_a_mole_image(app):
    for settings in (MoLESettings("dog+cat", {"dog": 0.7, "cat": 1.4}), MoLESettings("dog+cat", masked=["dog"])):
        (first,) = generate_composed(app, _request(seed=11, mole=settings), "mole")
        text = Image.open(first.path).text["parameters"]
        request, mode = request_from_infotext(app, text)
        assert mode == "mole" and request.mole.file == "dog+cat"
        assert request.mole.masked == settings.masked
        assert request.mole.scales == {"dog": 1.0, "cat": 1.0} | settings.scales
        (again,) = generate_composed(app, request, mode)
        assert np.array_equal(*_pixels([first, again]))
    (summed,) = generate_composed(app, _request(scales={"dog": 0.4, "cat": 1.1}), "sum")
    request, mode = request_from_infotext(app, summed.infotext)
    assert mode == "sum" and request.scales == {"dog": 0.4, "cat": 1.1} and request.mole is None


@pytest.mark.parametrize("mode, kwargs, message", [
    ("blend", {}, "unknown mode 'blend'"),
    ("mole", {}, "choose a MoLE file"),
    ("mole", dict(mole=MoLESettings("nope")), "no MoLE file 'nope' is loaded"),
    ("mole", dict(mole=MoLESettings("dog+cat", {"bird": 1.0})), "no expert bird in dog\\+cat"),
    ("compare", dict(mole=MoLESettings("dog+cat", masked=["dog", "cat"])), "every expert is masked"),
    ("mole", dict(mole=MoLESettings("dog+cat", {"dog": float("nan")})), "scale of expert 'dog' must be"),
    ("mole", dict(mole=MoLESettings("dog+cat", {"dog": 100.0})), "scale of expert 'dog' must be between"),
    ("sum", dict(scales={"dog": -50.0}), "scale of 'dog' must be between"),
])
def test_bad_compose_requests_are_refused_before_any_image(app, mode, kwargs, message):
    count, scales = app.generations, dict(app.fusion.scales)
    with pytest.raises((ComposeError, GenerationError), match=message):
        generate_composed(app, _request(**kwargs), mode)
    assert app.generations == count and app.fusion.scales == scales


def test_mole_files_only_from_the_allowed_folders(app, tmp_path):
    given = app.compose.paths["dog+cat"].parent.parent
    outside = tmp_path / "elsewhere"
    shutil.copytree(given / "dog+cat", outside)
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        app.compose.load(outside)
    (given / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        app.compose.load(given / "link")
    assert "link" not in app.compose.available()  # a link out of the root is not listed either
    with pytest.raises(MoLEError, match="is not a MoLE file"):
        app.compose.load(given / "dog" / "moslora.safetensors")  # an adapter is no MoLE file
    assert set(app.compose.available()) == {"dog+cat"} and list(app.compose.moles) == ["dog+cat"]
    with pytest.raises(GenerationError, match="not a parameters text"):
        request_from_infotext(app, "just a prompt")
