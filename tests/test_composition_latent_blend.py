"""Regional routing with blend="latent": each position's noise prediction is its region's expert alone (reading its
region prompt, in a frame centred on its region), the base model outside every region; a whole-image region is the
expert alone, a region of zeros the base model; a bad blend is one line before anything runs."""

import numpy as np
import pytest
import torch
from composition_helpers import pipeline_and_experts, pixels, request

from moslora_diffusion.composition import CompositionError, Region, compose
from moslora_diffusion.composition.latent_blend import LatentBlend
from moslora_diffusion.composition.regions import expert_masks, share_weights
from moslora_diffusion.composition.router import attach_router, detach_router
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.generation.text_to_image import GenerationRequest, run_pipeline

PIXEL_ATOL = 1.5 / 255  # uint8 rounding of hooks vs fused weights (the experts move pixels by > 0.1)
UNET_ATOL = 2e-5  # hooks vs fused weights on UNet outputs of magnitude ~1 (as the MoLE tests)


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


def _fused(pipe, dirs, name):
    fusion = FusedAdapters(pipe)
    fusion.add(name, dirs[name] / "moslora.safetensors", 1.0)
    return fusion


@pytest.mark.parametrize("blend", ["latent", "inpaint"])
@pytest.mark.parametrize("region_prompt", [None, "a photo of sks dog on grass"])
def test_a_whole_image_region_is_the_expert_alone_reading_its_region_prompt(setup, region_prompt, blend):
    """Both blends that draw an expert alone (inpaint: the host, which draws the whole picture)."""
    pipe, experts, dirs = setup
    req = request()
    result = compose(pipe, experts, "regional", req, [Region("dog", box=(0, 0, 1, 1), prompt=region_prompt)],
                     blend=blend)
    assert not hasattr(pipe, "_moslora_spatial_router") and "forward" not in vars(pipe.unet)
    fusion = _fused(pipe, dirs, "dog")
    try:
        alone_req = req if region_prompt is None else GenerationRequest(**{**vars(req), "prompt": region_prompt})
        alone = pixels(run_pipeline(pipe, alone_req, None))
    finally:
        fusion.remove("dog")
    assert np.abs(pixels(result.images) - alone).max() <= PIXEL_ATOL
    assert np.abs(alone - pixels(run_pipeline(pipe, req, None))).max() > 0.03  # the expert really acts


def test_a_region_of_zeros_is_the_base_model_exactly(setup):
    pipe, experts, _ = setup
    req = request(num_images=2)
    zeros = compose(pipe, experts, "regional", req, [Region("dog", mask=np.zeros((64, 64)), prompt="a cat")],
                    blend="latent")
    assert np.array_equal(pixels(zeros.images), pixels(run_pipeline(pipe, req, None)))


@pytest.mark.parametrize("width, height", [(64, 64), (96, 64)])
@torch.no_grad()
def test_each_position_reads_its_regions_expert_alone_in_a_centred_frame_and_the_base_elsewhere(setup, width,
                                                                                                height):
    pipe, experts, dirs = setup
    regions = [Region("dog", box=(0.0, 0.0, 0.5, 1.0)), Region("style", box=(0.5, 0.0, 0.75, 1.0))]
    masks = expert_masks(regions, ["dog", "style"], width, height)
    shares = torch.nn.functional.adaptive_avg_pool2d(share_weights(torch.from_numpy(masks)[None]),
                                                     (height // 2, width // 2))
    ids = [pipe.tokenizer([p], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for p in ("a photo", "a photo of sks dog on grass", "a painting")]
    contexts = [pipe.text_encoder(i)[0] for i in ids]  # the base encoder: this test is about the UNet
    x = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(0))
    router = attach_router(pipe, experts)
    try:
        router.set_shares(shares)
        router.set_contexts([None, contexts[1], contexts[2]])
        forward = LatentBlend(router, images=1, guidance=1.0).wrap(pipe.unet.forward)
        blended = forward(x, 500, encoder_hidden_states=contexts[0]).sample
    finally:
        detach_router(pipe)
    w = width // 2
    # each frame's centre on its box's centre, in latent columns: dog (0, 0.5) -> -w/4, style (0.5, 0.75) -> +w/8
    shifts = {"base": 0, "dog": -w // 4, "style": w // 8}
    expected = {}
    for name, context in (("base", contexts[0]), ("dog", contexts[1]), ("style", contexts[2])):
        fusion = _fused(pipe, dirs, name) if name != "base" else None
        try:
            framed = pipe.unet(x.roll(-shifts[name], dims=-1), 500, encoder_hidden_states=context).sample
            expected[name] = framed.roll(shifts[name], dims=-1)
        finally:
            if fusion:
                fusion.remove(name)
    columns = {"dog": slice(0, w // 2), "style": slice(w // 2, 3 * w // 4), "base": slice(3 * w // 4, w)}
    for name, cols in columns.items():
        assert (blended[..., cols] - expected[name][..., cols]).abs().max() <= UNET_ATOL, name
    assert (expected["dog"] - expected["base"]).abs().max() > 1e-3  # the experts really differ from the base
    assert (expected["style"] - expected["base"]).abs().max() > 1e-3


def test_an_unknown_blend_is_one_line_before_anything_runs(setup):
    pipe, experts, _ = setup
    with pytest.raises(CompositionError, match="blend .pixel.: choose attention, latent or inpaint"):
        compose(pipe, experts, "regional", request(), [Region("dog", box=(0, 0, 1, 1))], blend="pixel")
    with pytest.raises(CompositionError, match="takes no option blend"):
        compose(pipe, experts, "nla", request(), blend="latent")


def test_frame_offsets_put_each_regions_centre_at_the_frames_centre():
    from moslora_diffusion.composition.latent_blend import frame_offsets

    shares = torch.zeros(1, 3, 8, 12)
    shares[0, 0, :, :6] = 1.0  # the left half: centre column 3 of 12 -> 3 - 6
    shares[0, 1, 2:4, 9:12] = 0.5  # a small box at the top right: centre (3, 10.5) -> (3 - 4, 10.5 - 6)
    assert frame_offsets(shares) == [(0, -3), (-1, 4), (0, 0)]  # the third expert has no region: no roll
