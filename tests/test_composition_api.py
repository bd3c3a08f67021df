"""compose(): the whole-image methods dispatch to today's code and leave the pipeline as it was; every bad input
is one line before the pipeline is touched (pipe=None proves it)."""

import re

import numpy as np
import pytest
import torch
from composition_helpers import pipeline_and_experts, pixels, request
from mole_helpers import same_state, state

from moslora_diffusion.composition import METHODS, CompositionError, Region, check_layout, compose
from moslora_diffusion.composition.regions import expert_masks, share_weights
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.generation.text_to_image import run_pipeline

# uint8 images: the fused reference reads the files through another fold (alpha / r applied before or after the
# matmul), so a pixel may round the other way; the experts move pixels by far more (asserted).
PIXEL_ATOL = 1.5 / 255


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


def _fused(pipe, dirs, scale):
    fusion = FusedAdapters(pipe)
    for name, folder in dirs.items():
        fusion.add(name, folder / "moslora.safetensors", scale)
    try:
        return pixels(run_pipeline(pipe, request(), None))
    finally:
        for name in dirs:
            fusion.remove(name)


def test_contract_names():
    assert METHODS == ("sum", "nla", "mole", "switch", "composite", "regional", "auto", "spatial_mole")


def test_sum_and_nla_equal_the_fused_sliders_and_restore_the_pipeline(setup):
    pipe, experts, dirs = setup
    before = state(pipe)
    base = pixels(run_pipeline(pipe, request(), None))
    summed = pixels(compose(pipe, experts, "sum", request()).images)
    nla = pixels(compose(pipe, experts, "nla", request()).images)
    assert same_state(before, state(pipe))  # W0 back bit for bit
    assert np.abs(summed - _fused(pipe, dirs, 1.0)).max() <= PIXEL_ATOL
    assert np.abs(nla - _fused(pipe, dirs, 0.5)).max() <= PIXEL_ATOL
    assert np.abs(summed - base).max() > 0.1 and np.abs(summed - nla).max() > 0.05  # non-trivial deltas


def test_mole_with_uniform_gates_is_nla_and_reports_its_gates(setup):
    pipe, experts, dirs = setup
    result = compose(pipe, experts, "mole", request())
    assert result.masks is None and result.gate_report
    assert all(np.allclose(w, [0.5, 0.5], atol=1e-6) for w in result.gate_report.values())
    assert np.abs(pixels(result.images) - _fused(pipe, dirs, 0.5)).max() <= PIXEL_ATOL
    assert not hasattr(pipe, "_moslora_mole")  # detached


BOX = (0.0, 0.0, 0.5, 1.0)


@pytest.mark.parametrize("method, regions, options, gates, message", [
    ("blend", (), {}, False, "unknown composition method 'blend'"),
    ("sum", (Region("dog", box=BOX),), {}, False, "method 'sum' takes no regions"),
    ("mole", (Region("dog", box=BOX),), {}, False, "method 'mole' takes no regions"),
    ("auto", (Region("dog", box=BOX),), {}, False, "method 'auto' takes no regions"),
    ("regional", (), {}, False, "needs at least one region"),
    ("nla", (), {}, True, "method 'nla' takes no gates"),
    ("sum", (), {"every": 2}, False, "method 'sum' takes no option every"),
    ("regional", (Region("cat", box=BOX),), {}, False, "a region for expert 'cat', which is not there"),
    ("regional", (Region("dog", box=BOX), Region("dog", box=BOX)), {}, False, "two regions for expert 'dog'"),
    ("regional", (Region("dog"),), {}, False, "give a box or a mask (exactly one)"),
    ("regional", (Region("dog", box=(0.5, 0, 0.2, 1)),), {}, False, "must satisfy 0 <= x0 < x1 <= 1"),
    ("regional", (Region("dog", box=(0, 0, 1)),), {}, False, "a box is 4 numbers"),
    ("regional", (Region("dog", mask=np.ones((16, 16))),), {}, False, "the mask is 16x16 but the image is 64x64"),
    ("regional", (Region("dog", mask=np.full((64, 64), 2.0)),), {}, False, "not a mask (values must lie in [0, 1]"),
    ("regional", (Region("dog", mask=np.ones((64, 64, 3))),), {}, False, "a mask is a 2-D (height, width) array"),
    ("regional", (Region("dog", box=BOX, prompt=" "),), {}, False, "an empty region prompt"),
])
def test_bad_layouts_are_one_line_before_the_model(method, regions, options, gates, message, setup):
    _, experts, _ = setup
    with pytest.raises(CompositionError, match=re.escape(message)) as err:
        compose(None, experts, method, request(), regions, {"g": torch.zeros(1)} if gates else None, **options)
    assert "\n" not in str(err.value)


def test_overlapping_boxes_are_allowed_with_the_stated_rule():
    regions = [Region("a", box=(0, 0, 0.75, 1)), Region("b", box=(0.25, 0, 1, 1))]
    check_layout("regional", ["a", "b"], regions)
    soft = np.full((8, 8), 0.25, dtype=np.float32)
    masks = torch.from_numpy(np.stack([expert_masks(regions, ["a", "b"], 8, 8)[0],
                                       expert_masks(regions, ["a", "b"], 8, 8)[1], soft]))[None]
    shares = share_weights(masks)[0]
    # x in [2, 6): a, b and the soft mask overlap (sum 2.25): shared in proportion; elsewhere a or b alone + soft
    assert torch.allclose(shares[:, 0, 4], torch.tensor([1, 1, 0.25]) / 2.25)
    assert torch.allclose(shares[:, 0, 0], torch.tensor([1, 0, 0.25]) / 1.25)
    only_soft = share_weights(torch.from_numpy(soft)[None, None])  # a sum below 1 is kept: the rest is the base
    assert torch.equal(only_soft, torch.from_numpy(soft)[None, None])


def test_api_inputs_a_user_gets_wrong_are_named(tiny_sd15_dir, tmp_path):
    """A bool mask is a mask (it was 'a mask is a 2-D array, got (64, 64)'); no experts and a tuple for a region
    are one line each (they were a blank expert list and an AttributeError)."""
    pipe, experts, _ = pipeline_and_experts(tiny_sd15_dir, tmp_path)
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, :32] = True
    result = compose(pipe, experts, "regional", request(), [Region("dog", mask=mask)])
    assert result.masks[0]["dog"][:, :32].min() == 1.0 and result.masks[0]["dog"][:, 32:].max() == 0.0
    with pytest.raises(CompositionError, match="no experts to compose"):
        compose(pipe, [], "regional", request(), [Region("dog", box=(0, 0, 1, 1))])
    with pytest.raises(CompositionError, match="regions are Region.* objects, got tuple"):
        compose(pipe, experts, "regional", request(), [("dog", (0, 0, 1, 1))])
