"""Generation without a browser: bounded requests, schedulers, base/adapted comparison, reproducible PNGs."""

import numpy as np
import pytest
from conftest import make_adapter
from PIL import Image

from moslora_diffusion.app.paths import AllowedRoots
from moslora_diffusion.app.state import MODEL_LOADS, AppState, load_base_pipeline
from moslora_diffusion.generation.text_to_image import (
    SCHEDULERS,
    GenerationError,
    GenerationRequest,
    format_infotext,
    generate,
    parse_infotext,
    save_png,
    validate_request,
)


def _small(**kwargs):
    """2 steps at 64 px: the smallest request the app accepts, seconds on a tiny model."""
    values = dict(prompt="a photo of sks dog", steps=2, width=64, height=64, seed=7, guidance=5.0, scheduler="DDIM")
    return GenerationRequest(**(values | kwargs))


@pytest.fixture(scope="module")
def state(tiny_sd15_dir, tmp_path_factory):
    adapter = make_adapter(tiny_sd15_dir, tmp_path_factory.mktemp("given") / "dog" / "moslora.safetensors", seed=1)
    roots = AllowedRoots()
    roots.add(adapter.parent)
    app = AppState(load_base_pipeline(tiny_sd15_dir, device="cpu"), tiny_sd15_dir,
                   tmp_path_factory.mktemp("outputs"), roots)
    assert app.load_adapter(adapter.parent, scale=1.0) == "dog"
    return app


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("change, message", [
    (dict(prompt="   "), "enter a prompt"),
    (dict(width=4096), "width must be a multiple of 8 between 64 and 2048"),
    (dict(height=100), "height must be a multiple of 8"),
    (dict(steps=500), "steps must be between 1 and 150"),
    (dict(num_images=20), "number of images must be between 1 and 8"),
    (dict(seed=2**40), "seed must be between"),
    (dict(guidance="lots"), r"guidance \(CFG scale\) must be a number"),
    (dict(steps="ten"), "steps must be a whole number"),
    (dict(scheduler="LMS Karras"), "unknown scheduler"),
    (dict(scales={"cat": 1.0}), "no adapter loaded named cat"),
])
def test_bad_requests_are_refused_with_a_message(change, message):
    with pytest.raises(GenerationError, match=message):
        validate_request(_small(**change), loaded=["dog"])


def test_every_problem_is_named_at_once_and_random_seed_is_made_concrete():
    with pytest.raises(GenerationError) as err:
        validate_request(_small(prompt="", width=9000, steps=0))
    assert "prompt" in str(err.value) and "width" in str(err.value) and "steps" in str(err.value)
    clean = validate_request(_small(seed=-1, steps=2.0))
    assert 0 <= clean.seed < 2**32 and clean.steps == 2 and isinstance(clean.steps, int)


def test_bad_request_leaves_state_untouched_and_app_keeps_working(state):
    scales = dict(state.fusion.scales)
    with pytest.raises(GenerationError):
        state.generate(_small(prompt="", width=99999, scales={"dog": 0.2}))
    assert state.fusion.scales == scales
    assert len(state.generate(_small())) == 1


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_generates(state, scheduler):
    (item,) = generate(state.pipe, state.fusion, _small(scheduler=scheduler), "tiny", state.scheduler_config)
    assert item.image.size == (64, 64) and f"Sampler: {scheduler}," in item.infotext


def test_compare_with_base_gives_base_and_adapted_per_seed(state):
    request = _small(num_images=2, compare_with_base=True, scales={"dog": 0.8})
    items = generate(state.pipe, state.fusion, request, "tiny", state.scheduler_config)
    assert [(i.label, i.seed) for i in items] == [("base", 7), ("adapted", 7), ("base", 8), ("adapted", 8)]
    assert state.fusion.scales == {"dog": 0.8}
    base_only = generate(state.pipe, state.fusion, _small(num_images=2, scales={"dog": 0.0}), "tiny",
                         state.scheduler_config)
    assert (_pixels(items[0].image) == _pixels(base_only[0].image)).all()
    assert (_pixels(items[2].image) == _pixels(base_only[1].image)).all()
    assert abs(_pixels(items[1].image) - _pixels(items[0].image)).max() > 10
    assert "Lora scales: dog: 0.8" in items[1].infotext and "Lora scales: dog: 0" in items[0].infotext


def test_png_carries_parameters_that_reproduce_the_image(state, tmp_path):
    request = _small(negative_prompt="blurry", scales={"dog": 0.65}, scheduler="Euler a", seed=123)
    (item,) = generate(state.pipe, state.fusion, request, "tiny-sd15", state.scheduler_config)
    path = save_png(item, tmp_path)
    text = Image.open(path).text["parameters"]
    assert text == ("a photo of sks dog\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 5, "
                    "Seed: 123, Size: 64x64, Model: tiny-sd15, Lora scales: dog: 0.65")
    state.fusion.set_scales({"dog": -1.0})  # someone moved the slider meanwhile
    (again,) = generate(state.pipe, state.fusion, parse_infotext(text), "tiny-sd15", state.scheduler_config)
    assert (_pixels(again.image) == _pixels(Image.open(path).convert("RGB"))).all()
    assert save_png(item, tmp_path) != path  # never overwrites


def test_infotext_quotes_several_adapters_and_parses_back():
    request = _small(prompt="line one\nline two", scales={"a": 1.0, "b": -0.25})
    text = format_infotext(request, 5, request.scales, "m")
    assert 'Lora scales: "a: 1, b: -0.25"' in text and "Negative prompt" not in text
    parsed = parse_infotext(text)
    assert parsed.prompt == "line one\nline two" and parsed.scales == {"a": 1.0, "b": -0.25}
    assert (parsed.seed, parsed.steps, parsed.width, parsed.scheduler) == (5, 2, 64, "DDIM")


def test_progress_is_reported_per_step_and_model_is_never_reloaded(state):
    loads, pipe_id = MODEL_LOADS["count"], id(state.pipe)
    seen = []
    state.generate(_small(steps=3, scales={"dog": 0.1}, compare_with_base=True),
                   lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]  # base run then adapted run: one bar
    state.generate(_small(scales={"dog": 1.7}))
    assert MODEL_LOADS["count"] == loads and id(state.pipe) == pipe_id
    assert state.status()["adapters"] == {"dog": 1.7}
