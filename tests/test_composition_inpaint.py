"""Regional routing with blend="inpaint": the host (the first region's expert, or the background expert) draws the
whole picture, every later region's expert is drawn over it and changes nothing outside its region (bit for bit);
regions of zeros are the base model; fitting shrinks a later region to its subject; bad options are one line. A
whole-image region is the expert alone: test_composition_latent_blend.py, for both blends."""

import numpy as np
import pytest
import torch
from composition_helpers import PIXEL_ATOL, alone_pixels, pipeline_and_experts, pixels, request

from moslora_diffusion.composition import CompositionError, Region, compose, inpaint_blend
from moslora_diffusion.composition.inpaint_blend import pass_order
from moslora_diffusion.composition.latent_blend import frame_offsets
from moslora_diffusion.generation.text_to_image import GenerationRequest, run_pipeline

LONG_PROMPT = "a photo of sks dog on green grass beside a red house under a blue sky with white clouds, sharp"


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


@pytest.fixture
def passes(monkeypatch):
    """Every pass's latents after its last step, in the order the passes ran."""
    finals = []

    def recording(pipe, req, progress, embeddings=None, step_latents=None):
        def step(index, latents):
            out = step_latents(index, latents)
            if index == req.steps - 1:
                finals.append(out.clone())
            return out
        return run_pipeline(pipe, req, progress, embeddings, step)

    monkeypatch.setattr(inpaint_blend, "run_pipeline", recording)
    return finals


def test_regions_of_zeros_are_the_base_model_exactly(setup):
    pipe, experts, _ = setup
    req = request(num_images=2)
    zeros = [Region("dog", mask=np.zeros((64, 64)), prompt="a cat"), Region("style", mask=np.zeros((64, 64)))]
    result = compose(pipe, experts, "regional", req, zeros, blend="inpaint")
    assert np.array_equal(pixels(result.images), pixels(run_pipeline(pipe, req, None)))


@pytest.mark.parametrize("width, height, prompt", [(64, 64, "a photo of sks dog"), (96, 64, LONG_PROMPT)])
def test_a_later_expert_changes_nothing_outside_its_region_bit_for_bit(setup, passes, width, height, prompt):
    """The host (dog, the first region) draws the picture; style is drawn over it in the right half. Outside that
    half the final latents are the host's, exactly; inside they are style's own. Two sizes, two prompt lengths."""
    pipe, experts, _ = setup
    req = request(prompt, num_images=2, size=width)
    req = GenerationRequest(**{**vars(req), "height": height})
    layout = [Region("dog", box=(0, 0, 0.5, 1), prompt="a photo of sks dog"), Region("style", box=(0.5, 0, 1, 1))]
    result = compose(pipe, experts, "regional", req, layout, blend="inpaint")
    host, later = passes
    inside = torch.zeros(host.shape[-2:], dtype=torch.bool)
    inside[:, host.shape[-1] // 2:] = True
    assert torch.equal(later[..., ~inside], host[..., ~inside])
    assert (later[..., inside] - host[..., inside]).abs().max() > 1e-3  # style really drew its half
    masks = result.masks[0]
    assert masks["style"][:, width // 2:].min() == 1 and masks["style"][:, :width // 2].max() == 0
    assert np.array_equal(masks["dog"], 1 - masks["style"])  # the host: everything the later region left


def test_the_regions_order_picks_the_host(setup, passes):
    """The first region's expert draws the first picture (the same as its region alone: it covers the whole image
    in its frame); the other is drawn over it. The masks are the same either way; the pictures are not."""
    pipe, experts, _ = setup
    req = request()
    dog, style = Region("dog", box=(0, 0, 0.5, 1)), Region("style", box=(0.5, 0, 1, 1))
    results = {}
    for order in ([style, dog], [dog, style]):
        passes.clear()
        alone = compose(pipe, experts, "regional", req, order[:1], blend="inpaint")
        (host_alone,) = passes
        passes.clear()
        results[order[0].expert] = both = compose(pipe, experts, "regional", req, order, blend="inpaint")
        assert torch.equal(passes[0], host_alone) and len(passes) == 2
        assert np.array_equal(alone.masks[0][order[0].expert], np.ones((64, 64), np.float32))  # it drew it all
        assert both.masks[0]["dog"][:, :32].min() == 1 and both.masks[0]["dog"][:, 32:].max() == 0
        assert np.array_equal(both.masks[0]["style"], 1 - both.masks[0]["dog"])
    assert not np.array_equal(pixels(results["style"].images), pixels(results["dog"].images))


def test_a_later_region_of_zeros_leaves_the_hosts_picture_bit_for_bit(setup):
    pipe, experts, _ = setup
    req = request(num_images=2)
    dog = Region("dog", box=(0, 0, 0.5, 1), prompt="a photo of sks dog")
    alone = compose(pipe, experts, "regional", req, [dog], blend="inpaint")
    with_zeros = compose(pipe, experts, "regional", req, [dog, Region("style", mask=np.zeros((64, 64)))],
                         blend="inpaint")
    assert np.array_equal(pixels(alone.images), pixels(with_zeros.images))
    assert with_zeros.masks[0]["style"].max() == 0


def test_the_background_expert_hosts_reading_the_global_prompt_unrolled(setup):
    """With a background and a region of zeros, the picture is the background expert alone on the global prompt."""
    pipe, experts, dirs = setup
    req = request()
    only = compose(pipe, experts, "regional", req, [Region("dog", mask=np.zeros((64, 64)))], blend="inpaint",
                   background="style")
    assert np.abs(pixels(only.images) - alone_pixels(pipe, dirs, "style", req)).max() <= PIXEL_ATOL
    drawn = compose(pipe, experts, "regional", req, [Region("dog", box=(0, 0, 0.5, 1))], blend="inpaint",
                    background="style")
    assert np.array_equal(drawn.masks[0]["style"], 1 - drawn.masks[0]["dog"])
    assert drawn.masks[0]["dog"][:, :32].min() == 1
    assert np.abs(pixels(drawn.images) - pixels(only.images)).max() > 0.01  # the dog expert really drew its half


def test_fitting_shrinks_a_later_region_to_its_subject_and_the_picture_so_far_keeps_the_rest(setup, passes,
                                                                                             monkeypatch):
    pipe, experts, _ = setup
    monkeypatch.setattr("moslora_diffusion.composition.latent_blend.DEFAULT_FIT_THRESHOLD", 0.9)  # boxes shrink
    req = request(steps=4, num_images=2)
    layout = [Region("dog", box=(0, 0, 0.5, 1), prompt="a photo of sks dog"), Region("style", box=(0.5, 0, 1, 1))]
    fitted = compose(pipe, experts, "regional", req, layout, blend="inpaint", fit_steps=1)
    host, later = passes
    for b, masks in enumerate(fitted.masks):
        style = masks["style"]
        assert style[:, :32].max() == 0 and 0 < style.sum() < 32 * 64  # inside its box, smaller than it
        assert np.array_equal(masks["dog"], 1 - style)
        cell = 64 // host.shape[-1]  # pixels per latent cell
        kept = torch.from_numpy(style[::cell, ::cell] == 0)  # latent cells the later expert gave back
        assert torch.equal(later[b][:, kept], host[b][:, kept])


def test_pass_order_and_pulled_frames():
    shares = torch.zeros(1, 3, 8, 8)
    shares[0, 1, :, :4] = 1  # expert 1: the left half
    shares[0, 2, :, 4:] = 1  # expert 2: the right half; expert 0 has no area
    assert pass_order(shares, [0, 2, 1], None) == (2, [1])  # the first region with any area hosts
    assert pass_order(shares, [1, 2], 0) == (0, [1, 2])  # the background hosts
    assert pass_order(torch.zeros(1, 2, 8, 8), [0, 1], None) == (None, [])  # nothing drawn: the base model
    assert frame_offsets(shares) == [(0, 0), (0, -2), (0, 2)]
    assert frame_offsets(shares, 0.5) == [(0, 0), (0, -1), (0, 1)]  # halfway to the image's centre


def test_bad_inpaint_options_are_one_line_before_anything_runs(setup):
    pipe, experts, _ = setup
    whole = [Region("dog", box=(0, 0, 1, 1))]
    with pytest.raises(CompositionError, match="fit_steps has nothing to fit: every region covers the whole image"):
        compose(pipe, experts, "regional", request(steps=4), whole, blend="inpaint", fit_steps=1)
    with pytest.raises(CompositionError, match="fit_steps 4: give a whole number of steps"):
        compose(pipe, experts, "regional", request(steps=4), [Region("dog", box=(0, 0, 0.5, 1))], blend="inpaint",
                fit_steps=4)
