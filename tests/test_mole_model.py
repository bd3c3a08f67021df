"""MoLE on a pipeline: fixed gates reproduce each expert alone and the NLA sum, masking renormalises, gates are
per sample and independent of resolution and prompt length, detach restores the pipeline bit for bit."""

import math

import numpy as np
import pytest
import torch
from conftest import generate
from diffusers import DiffusionPipeline
from mole_helpers import forward, make_experts, same_state, state
from PIL import Image

from moslora_diffusion.generation.fusion import FusedAdapters
from moslora_diffusion.mole import (
    UNGATED,
    attach_mole,
    balance_loss,
    detach_mole,
    load_experts,
    render_gate_heatmap,
    save_gate_heatmap,
)
from moslora_diffusion.mole.report import CELL_H, CELL_W, HIGH, LOW, PAD

# The hooks compute W x + sum_i g_i up_i (down_i x); the fused reference (W + sum_i g_i delta_i) x. Equal up to
# fp32 reassociation: observed <= 1.6e-6 on UNet outputs of magnitude ~1.3 (each expert moves them by 0.17-0.73).
ATOL = 2e-5
PROMPTS = ["a photo of sks dog"]


@pytest.fixture(scope="module")
def expert_dirs(tiny_dirs, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_experts(tiny_dirs[family], tmp_path_factory.mktemp(f"experts-{family}"))
        return made[family]

    return get


def _fused_reference(model_dir, dirs) -> tuple:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    fused = FusedAdapters(pipe)
    for name, folder in dirs.items():
        fused.add(name, folder / "moslora.safetensors", 0.0)
    return pipe, fused


def _attached(model_dir, dirs):
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    return pipe, attach_mole(pipe, load_experts(pipe, list(dirs.values())))


@torch.no_grad()
def _randomise_gates(mole, seed=0):
    """Gates as training might leave them: logits of order 1 that depend on the features."""
    g = torch.Generator().manual_seed(seed)
    for gate in mole.gates:
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.5)
        gate.log_temperature.fill_(0.2)


def _close(a, b, atol=ATOL):
    return (a - b).abs().max().item() <= atol


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_hot_gates_equal_each_expert_alone_and_equal_gates_the_nla_sum(family, tiny_dirs, expert_dirs):
    dirs = expert_dirs(family)
    pipe, mole = _attached(tiny_dirs[family], dirs)
    reference, fused = _fused_reference(tiny_dirs[family], dirs)
    base_text, base_out = forward(reference, PROMPTS)
    assert mole.has_ungated_layers  # style adapts the resnets' time_emb_proj: the one-hot weights reach them too
    outputs = []
    for i, name in enumerate(dirs):
        mole.set_fixed_gates([1.0 if j == i else 0.0 for j in range(len(dirs))])
        fused.set_scales({n: 1.0 if n == name else 0.0 for n in dirs})
        (text, out), (ref_text, ref_out) = forward(pipe, PROMPTS), forward(reference, PROMPTS)
        assert _close(out, ref_out) and _close(text, ref_text), name
        assert (ref_out - base_out).abs().max() > 1e-2, name  # each expert really changes the UNet output
        outputs.append(out)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # and the experts differ
    fused.set_scales(dict.fromkeys(dirs, 1 / 3))  # NLA: weights summing to 1
    nla_text, nla_out = forward(reference, PROMPTS)
    mole.set_fixed_gates([1 / 3] * 3)
    text, out = forward(pipe, PROMPTS)
    assert _close(out, nla_out) and _close(text, nla_text)
    mole.set_fixed_gates(None)  # learned gates start uniform: MoLE begins exactly at NLA
    text, out = forward(pipe, PROMPTS)
    assert _close(out, nla_out) and _close(text, nla_text)
    if family == "sdxl":
        assert {b.component for b in mole.blocks} == {"unet", "text_encoder", "text_encoder_2"}


def test_extra_scales_multiply_each_expert(tiny_sd15_dir, expert_dirs):
    dirs = expert_dirs("sd15")
    pipe, mole = _attached(tiny_sd15_dir, dirs)
    reference, fused = _fused_reference(tiny_sd15_dir, dirs)
    mole.set_fixed_gates([0.5, 0.25, 0.25])
    mole.set_scales({"dog": 2.0, "style": -1.0})
    fused.set_scales({"dog": 1.0, "cat": 0.25, "style": -0.25})
    assert _close(forward(pipe, PROMPTS)[1], forward(reference, PROMPTS)[1])


def test_masking_renormalises_the_remaining_gates(tiny_sd15_dir, expert_dirs):
    dirs = expert_dirs("sd15")
    pipe, mole = _attached(tiny_sd15_dir, dirs)
    _randomise_gates(mole)
    forward(pipe, PROMPTS)
    unmasked = mole.gate_report()
    assert min(w[1] for b, w in unmasked.items() if b != UNGATED) > 1e-3  # cat has weight everywhere unmasked
    mole.reset_report()
    mole.set_mask(["cat"])
    _, masked_out = forward(pipe, PROMPTS)
    report = mole.gate_report()
    assert report.keys() == unmasked.keys()
    for block, weights in report.items():
        assert weights[1] == 0.0 and math.isclose(sum(weights), 1.0, abs_tol=1e-6), block
    # The first gate's input does not depend on the mask: softmax over its kept logits = its kept weights
    # renormalised (later blocks see hidden states the mask has changed).
    first = report["text_encoder.text_model.encoder.layers.0"]
    kept = torch.tensor(unmasked["text_encoder.text_model.encoder.layers.0"])[[0, 2]]
    assert torch.allclose(torch.tensor(first)[[0, 2]], kept / kept.sum(), atol=1e-6)
    mole.set_fixed_gates(report)  # the same weights held constant give the same output
    assert _close(forward(pipe, PROMPTS)[1], masked_out)
    mole.set_fixed_gates(None)
    mole.set_mask(None)
    assert (forward(pipe, PROMPTS)[1] - masked_out).abs().max() > 1e-3


def test_gates_are_per_sample(tiny_sd15_dir, expert_dirs):
    """A classifier-free-guidance batch holds different prompts: each sample gets its own gate weights."""
    pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
    _randomise_gates(mole)
    prompts = ["a photo of sks dog", ""]
    _, batch_out = forward(pipe, prompts)
    gates = mole.current_gates()["unet.down_blocks.0.attentions.0"]
    assert gates.shape == (2, 3) and (gates[0] - gates[1]).abs().max() > 1e-3
    for i, prompt in enumerate(prompts):
        cond = pipe.text_encoder(pipe.tokenizer([prompt], padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0]
        with torch.no_grad():
            alone = pipe.unet(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))[i:i + 1], 500,
                              cond).sample
        assert _close(alone[0], batch_out[i]), prompt


def test_gates_accept_any_resolution_and_prompt_length(tiny_sd15_dir, expert_dirs):
    pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
    _randomise_gates(mole)
    n = len(mole.experts)
    expected = sum(b.features * n + n + 1 for b in mole.blocks)
    count = sum(p.numel() for p in mole.parameters())
    assert count == expected and count < 1500  # (C + D) N + N + 1 per block: tiny blocks are 32-64 wide
    reports = {}
    for size, length in ((16, 77), (24, 77), (16, 20)):
        mole.reset_report()
        _, out = forward(pipe, PROMPTS, size=size, length=length)
        assert out.shape == (1, 4, size, size) and torch.isfinite(out).all()
        reports[(size, length)] = mole.gate_report()
        assert sum(p.numel() for p in mole.parameters()) == count

    def gap(a, b, block):
        return max(abs(x - y) for x, y in zip(reports[a][block], reports[b][block], strict=True))

    unet_block = "unet.down_blocks.0.attentions.0"
    text_block = "text_encoder.text_model.encoder.layers.0"
    assert gap((16, 77), (24, 77), unet_block) > 1e-4  # another resolution: other image features
    assert gap((16, 77), (24, 77), text_block) < 1e-6  # the text encoder does not see the resolution
    assert gap((16, 77), (16, 20), text_block) > 1e-4  # fewer padding tokens: another mean


def test_balance_loss_is_minimal_at_uniform_usage_and_trains_the_gates(tiny_sd15_dir, expert_dirs):
    pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
    for name in ("unet", "text_encoder"):
        getattr(pipe, name).requires_grad_(False)

    def loss():
        mole.clear_gates()
        cond = pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0]
        pipe.unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500, cond)
        return balance_loss(mole)

    uniform = loss()
    assert math.isclose(uniform.item(), 3 * math.log(3), rel_tol=1e-6)  # -sum log(1/3): the minimum
    uniform.backward()
    assert all(p.grad.abs().max() < 1e-6 for p in mole.parameters())  # a stationary point
    mole.zero_grad()
    with torch.no_grad():
        for gate in mole.gates:
            gate.bias.copy_(torch.tensor([1.5, 0.0, -1.0]))
    skewed = loss()
    assert skewed.item() > uniform.item() + 0.1
    skewed.backward()
    assert all(gate.weight.grad.abs().max() > 1e-4 and gate.bias.grad.abs().max() > 1e-4 for gate in mole.gates)
    with torch.no_grad():
        for p in mole.parameters():
            p -= 0.05 * p.grad
    assert loss().item() < skewed.item()  # one gradient step moves the usage back toward uniform


def test_detach_restores_the_pipeline_bit_for_bit(tiny_sd15_dir, expert_dirs):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    before, (_, base_out) = state(pipe), forward(pipe, PROMPTS)
    mole = attach_mole(pipe, load_experts(pipe, list(expert_dirs("sd15").values())))
    _randomise_gates(mole)
    assert (forward(pipe, PROMPTS)[1] - base_out).abs().max() > 1e-2
    assert detach_mole(pipe) is mole
    assert same_state(state(pipe), before)
    assert torch.equal(forward(pipe, PROMPTS)[1], base_out)
    for model in (pipe.unet, pipe.text_encoder):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision_inference(tiny_sd15_dir, expert_dirs, dtype, atol):
    pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
    _randomise_gates(mole)
    _, reference = forward(pipe, PROMPTS)
    pipe.to(dtype)
    with torch.no_grad():
        cond = pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0]
        out = pipe.unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype), 500,
                        cond).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < atol  # observed 0.016 (bf16), 0.0024 (fp16) vs fp32
    assert all(p.dtype == torch.float32 for p in mole.parameters())  # gates stay fp32


def test_generation_and_its_gate_heatmap(tiny_sd15_dir, expert_dirs, tmp_path):
    pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
    _randomise_gates(mole)
    image = generate(pipe)  # the pipeline's own call: classifier-free guidance, 2 steps, under no_grad
    assert np.isfinite(image).all()
    learned = mole.gate_report()  # averaged over both CFG halves and both steps
    assert learned.keys() == {b.name for b in mole.blocks} | {UNGATED}
    assert all(math.isclose(sum(w), 1.0, abs_tol=1e-6) for w in learned.values())
    mole.reset_report()
    mole.set_fixed_gates([1.0, 0.0, 0.0])
    generate(pipe)
    report = mole.gate_report()
    path = save_gate_heatmap(report, mole.expert_names, tmp_path / "gates.png", title="a photo of sks dog")
    image = Image.open(path).convert("RGB")
    assert image.size == render_gate_heatmap(report, mole.expert_names, "a photo of sks dog").size
    first_cell_x = image.width - PAD - CELL_W * 3
    first_row_y = image.height - PAD - CELL_H * len(report)
    assert image.getpixel((first_cell_x + 1, first_row_y + 1)) == HIGH  # dog: weight 1 in every block
    assert image.getpixel((first_cell_x + CELL_W + 1, first_row_y + 1)) == LOW  # cat: weight 0
    with pytest.raises(ValueError, match="empty"):
        render_gate_heatmap({}, mole.expert_names)


def test_gate_gradients_are_the_same_with_gradient_checkpointing(tiny_sd15_dir, expert_dirs):
    """Training may checkpoint the UNet: the experts' layers are then recomputed in backward, reading the gate
    weights their block computed in forward; the gate gradients do not change."""
    grads = []
    for checkpointing in (False, True):
        pipe, mole = _attached(tiny_sd15_dir, expert_dirs("sd15"))
        _randomise_gates(mole)
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.unet.train()
        mole.clear_gates()
        cond = pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0]
        out = pipe.unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500, cond).sample
        (out.pow(2).mean() + 0.5 * balance_loss(mole)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in mole.parameters()]))
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_prompt_features_without_a_mask_are_not_swamped_by_padding():
    """Two prompts padded to 77 tokens that differ only in their first 5 tokens: a mean over all tokens is
    mostly padding (nearly the same vector), the max keeps the difference; with a mask the mean of the valid
    tokens is taken."""
    from moslora_diffusion.mole.gates import pooled_tokens

    generator = torch.Generator().manual_seed(0)
    padding = torch.randn(1, 1, 16, generator=generator).expand(2, 72, -1)  # the same pad token, 72 times
    words = torch.randn(2, 5, 16, generator=generator)
    hidden = torch.cat([words, padding], dim=1)

    def cosine(pooled):
        a, b = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    assert cosine(hidden.mean(dim=1)) > 0.99 and cosine(pooled_tokens(hidden)) < 0.5
    valid = torch.zeros(2, 77, dtype=torch.bool)
    valid[:, :5] = True
    assert torch.allclose(pooled_tokens(hidden, valid), words.mean(dim=1), atol=1e-6)
