"""Spatial MoLE: gates evaluated per position. One-hot gates are each expert alone and equal gates the NLA sum
(through the per-position path, at two resolutions and two prompt lengths); learned gates vary over positions;
the composition reports the map of the gates."""

import numpy as np
import pytest
import torch
from composition_helpers import pipeline_and_experts, request
from mole_helpers import forward

from moslora_diffusion.composition import compose
from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.mole import attach_mole, balance_loss, detach_mole

UNET_ATOL = 2e-5  # hooks vs fused weights on UNet outputs of magnitude ~1 (as the MoLE tests); a gate of
# logit gap 80 leaves the other expert exp(-80) ~ 2e-35 of weight
PROMPT = ["a photo of sks dog"]


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def gated_only(tiny_sd15_dir, tmp_path_factory):
    """dog and cat adapt layers inside blocks only: no ungated layer holds the constant 1/N weight."""
    return pipeline_and_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"), ("dog", "cat"))


@torch.no_grad()
def _gates(mole, winner=None, seed=0):
    """Random feature weights (the gate reads every position); a bias of +-40 makes `winner` take every position."""
    g = torch.Generator().manual_seed(seed)
    for gate in mole.gates:
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
        gate.bias.copy_(torch.tensor([40.0, -40.0] if winner == 0 else [-40.0, 40.0]) if winner is not None
                        else torch.randn(gate.bias.shape, generator=g) * 0.5)


def _fused(pipe, experts, scales, size, length):
    fusion = FusedAdapters(pipe)
    for expert, scale in zip(experts, scales, strict=True):
        fusion.add_folded(expert.folded, scale)
    try:
        return forward(pipe, PROMPT, size=size, length=length)[1]
    finally:
        for expert in experts:
            fusion.remove(expert.name)


def test_fixed_one_hot_gates_of_a_spatial_mole_are_each_expert_alone(setup):
    pipe, experts, _ = setup  # style adapts the ungated time_emb_proj: fixed gates reach it too
    mole = attach_mole(pipe, experts, granularity="position")
    outputs = []
    for winner in (0, 1):
        mole.set_fixed_gates([1.0 if i == winner else 0.0 for i in range(2)])
        outputs.append(forward(pipe, PROMPT)[1])
    detach_mole(pipe)
    for winner, out in enumerate(outputs):
        alone = _fused(pipe, experts, [1.0 if i == winner else 0.0 for i in range(2)], 16, 77)
        assert (out - alone).abs().max() <= UNET_ATOL
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("size, length", [(16, 77), (24, 20)])
def test_one_hot_position_gates_are_each_expert_alone_and_equal_gates_nla(gated_only, size, length):
    pipe, experts, _ = gated_only
    mole = attach_mole(pipe, experts, granularity="position")
    outputs = []
    for winner in (0, 1, None):
        _gates(mole, winner)
        if winner is None:  # W = 0, b = 0: 1/N at every position
            with torch.no_grad():
                for gate in mole.gates:
                    gate.weight.zero_()
                    gate.bias.zero_()
        outputs.append(forward(pipe, PROMPT, size=size, length=length)[1])
        assert any(w.dim() == 3 for w in mole.current_gates().values())  # the per-position path ran
    detach_mole(pipe)
    for scales, out in zip(([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]), outputs, strict=True):
        assert (out - _fused(pipe, experts, scales, size, length)).abs().max() <= UNET_ATOL, scales
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


def test_learned_position_gates_vary_over_positions_and_train(setup):
    pipe, experts, _ = setup
    spatial = attach_mole(pipe, experts, granularity="position")
    try:
        _gates(spatial, seed=1)
        out = forward(pipe, PROMPT)[1]
        per_position = [w for w in spatial.current_gates().values() if w.dim() == 3]
        assert per_position and max(float(w[..., 0].std(dim=1).max()) for w in per_position) > 1e-3
        state = spatial.gate_state()
    finally:
        detach_mole(pipe)
    attach_mole(pipe, experts, gates=state)  # the same parameters, one gate per block
    try:
        assert (forward(pipe, PROMPT)[1] - out).abs().max() > 1e-4
    finally:
        detach_mole(pipe)
    spatial = attach_mole(pipe, experts, gates=state, granularity="position")
    try:
        cond = pipe.text_encoder(pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids)[0]
        pipe.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=cond)
        balance_loss(spatial).backward()  # the balance loss reaches the per-position gates
        assert all(float(g.weight.grad.abs().max()) > 0 for g, b in zip(spatial.gates, spatial.blocks, strict=True)
                   if b.kind == "unet")
    finally:
        detach_mole(pipe)


def test_spatial_mole_composition_reports_its_gate_map(setup):
    pipe, experts, _ = setup
    gates = {k: (torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * 0.3 if k.endswith("weight")
                 else v) for k, v in attach_mole(pipe, experts).gate_state().items()}
    detach_mole(pipe)
    result = compose(pipe, experts, "spatial_mole", request(num_images=2), gates=gates)
    assert not hasattr(pipe, "_moslora_mole") and len(result.images) == 2
    total = result.masks[0]["dog"] + result.masks[0]["style"]
    assert np.allclose(total, 1.0, atol=1e-5) and result.masks[0]["dog"].std() > 1e-3


def test_a_spatial_mole_file_loads_as_spatial(setup, tmp_path):
    from moslora_diffusion.mole import load_mole, save_mole

    pipe, experts, _ = setup
    attach_mole(pipe, experts, granularity="position")
    path = save_mole(detach_mole(pipe), tmp_path / "m.safetensors")
    mole = load_mole(pipe, path)
    try:
        assert mole.granularity == "position"
    finally:
        detach_mole(pipe)
