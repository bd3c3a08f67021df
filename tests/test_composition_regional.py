"""Regional routing: a whole-image region is the expert alone, a region of zeros the base model, an expert's delta
is exactly zero outside its region (every adapted layer, every cross-attention), at two resolutions and two
prompt lengths."""

import numpy as np
import pytest
import torch
from composition_helpers import PIXEL_ATOL, alone_pixels, pipeline_and_experts, pixels, request
from mole_helpers import same_state, state

from moslora_diffusion.composition import Region, compose
from moslora_diffusion.composition.regions import expert_masks, share_weights
from moslora_diffusion.composition.router import attach_router, detach_router
from moslora_diffusion.generation.text_to_image import run_pipeline

UNET_ATOL = 2e-5  # hooks vs fused weights on UNet outputs of magnitude ~1 (as the MoLE tests)


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


@pytest.mark.parametrize("name, guidance", [("dog", 5.0), ("style", 5.0), ("style", 1.0)])
def test_a_region_over_the_whole_image_is_the_expert_alone(setup, name, guidance):
    pipe, experts, dirs = setup
    before = state(pipe)
    req = request(guidance=guidance)  # 1.0: no classifier-free guidance batch
    result = compose(pipe, experts, "regional", req, [Region(name, box=(0, 0, 1, 1))])
    assert same_state(before, state(pipe)) and not hasattr(pipe, "_moslora_spatial_router")
    alone = alone_pixels(pipe, dirs, name, req)
    assert np.abs(pixels(result.images) - alone).max() <= PIXEL_ATOL
    base = pixels(run_pipeline(pipe, req, None))
    assert np.abs(alone - base).max() > 0.03  # >> PIXEL_ATOL: the expert really acts
    assert result.masks[0][name].min() == 1.0 and result.masks[0][name].shape == (64, 64)
    other = next(e.name for e in experts if e.name != name)
    assert result.masks[0][other].max() == 0.0


def test_a_region_of_zeros_leaves_the_base_model(setup):
    pipe, experts, _ = setup
    req = request(num_images=2)
    zeros = compose(pipe, experts, "regional", req, [Region("dog", mask=np.zeros((64, 64)), prompt="a cat")])
    assert np.array_equal(pixels(zeros.images), pixels(run_pipeline(pipe, req, None)))


def _record_deltas(pipe, router):
    """Every adapted layer's delta (output with the router minus without), from hooks around the router's own."""
    before, deltas, handles = {}, {}, []
    for key, module, _ in router.layers:
        if key[0] != "unet":
            continue
        handles.append(module.register_forward_hook(lambda m, a, o, k=key: before.__setitem__(k, o.detach())))
        module._forward_hooks.move_to_end(handles[-1].id, last=False)  # runs before the router's hook
        handles.append(module.register_forward_hook(lambda m, a, o, k=key: deltas.__setitem__(
            k, (a[0].shape, o.detach() - before[k]))))
    return deltas, handles


@pytest.mark.parametrize("width, height, length", [(64, 64, 77), (96, 64, 12)])
@torch.no_grad()
def test_an_experts_delta_outside_its_region_is_exactly_zero(setup, width, height, length):
    pipe, experts, _ = setup
    router = attach_router(pipe, experts)
    try:
        masks = expert_masks([Region("dog", box=(0.0, 0.25, 0.5, 0.75))], ["dog", "style"], width, height)
        shares = torch.nn.functional.adaptive_avg_pool2d(share_weights(torch.from_numpy(masks)[None]),
                                                         (height // 2, width // 2))
        router.set_shares(shares)
        contexts = []
        for branch, prompt in enumerate(["a photo", "a photo of sks dog on grass", "a photo"]):
            ids = pipe.tokenizer([prompt], padding="max_length", max_length=length if branch else 77,
                                 truncation=True, return_tensors="pt").input_ids
            router.branch = branch
            contexts.append(pipe.text_encoder(ids)[0])
            router.branch = None
        router.set_contexts([None, contexts[1], contexts[2]])
        deltas, handles = _record_deltas(pipe, router)
        cross = {}
        for attn in router.cross_attentions:
            handles.append(attn.register_forward_hook(
                lambda m, a, k, o: cross.__setitem__(m, (a[0] if a else k["hidden_states"], o)), with_kwargs=True))
        x = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(0))
        pipe.unet(x, 500, encoder_hidden_states=contexts[0])
        for h in handles:
            h.remove()
        checked = 0
        for key, (shape, delta) in deltas.items():
            if len(shape) == 2 or ".attn2." in key[1]:  # no positions (time_emb_proj); cross-attention: below
                continue
            weights = router.position_shares(torch.empty(shape), len(shape) == 4)[..., 0]  # dog's share
            flat = delta if len(shape) == 3 else delta.permute(0, 2, 3, 1)
            outside = flat[weights == 0]
            assert outside.numel() and torch.count_nonzero(outside) == 0, key
            if key in experts[0].layers:  # inside, dog's delta is there (style has no region: zero everywhere)
                assert flat[weights > 0].abs().max() > 1e-4, key
                checked += 1
            else:
                assert torch.count_nonzero(flat) == 0, key
        assert checked >= 8
        for attn, (hidden, out) in cross.items():  # outside the region: the base model's cross-attention
            weights = router.position_shares(hidden, False)[..., 0]
            router.branch = 0
            base = router._processors[attn](attn, hidden, encoder_hidden_states=contexts[0])
            router.branch = None
            assert torch.equal(out[weights == 0], base[weights == 0])
            assert (out[weights > 0] - base[weights > 0]).abs().max() > 1e-5
    finally:
        detach_router(pipe)
