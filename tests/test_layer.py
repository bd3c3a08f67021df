"""The MoSLoRA layer alone: the formula, the LoRA baseline, merge/unmerge, fold, dtypes, gradients."""

import pytest
import torch
from torch import nn

from moslora_diffusion.moslora.layer import MoSLoRALinear

ATOL = 1e-5  # fp32 matmuls in a different association order


def _layer(kind="moslora", mixer_init="kaiming", rank=4, alpha=8.0, base=None, seed=0):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(16, 12)
    layer = MoSLoRALinear(base, rank=rank, alpha=alpha, kind=kind, mixer_init=mixer_init)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # non-zero B: the adapter really changes the output
    return layer


def test_forward_is_w_x_plus_scaled_b_m_a_x():
    layer = _layer()
    layer.set_scale(0.7)
    x = torch.randn(3, 5, 16)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, M, B = layer.lora_A, layer.lora_M, layer.lora_B
    expected = x @ W.T + b + 0.7 * (8.0 / 4) * (x @ A.T @ M.T @ B.T)
    assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-3)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_lora_kind_equals_independent_plain_lora():
    layer = _layer(kind="lora", mixer_init="kaiming")  # the init request is overridden: M = I
    assert torch.equal(layer.lora_M, torch.eye(4)) and not layer.lora_M.requires_grad
    x = torch.randn(7, 16)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    plain_lora = x @ W.T + b + (8.0 / 4) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), plain_lora, atol=ATOL, rtol=0)


def test_zero_b_init_and_zero_scale_give_the_base_output_exactly():
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(16, 12), rank=4, alpha=4)
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 at init
    layer = _layer()
    layer.set_scale(0.0)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("init", ["kaiming", "orthogonal", "identity"])
def test_mixer_inits(init):
    layer = _layer(mixer_init=init, rank=6)
    M = layer.lora_M.detach()
    if init == "orthogonal":
        torch.testing.assert_close(M.T @ M, torch.eye(6), atol=1e-5, rtol=0)
    elif init == "identity":
        assert torch.equal(M, torch.eye(6))
    else:
        assert not torch.allclose(M, torch.eye(6)) and M.abs().sum() > 0
    assert layer.lora_M.requires_grad  # a moslora mixer trains whatever its init


def test_merge_equals_unmerged_and_unmerge_is_bit_exact():
    layer = _layer()
    x = torch.randn(4, 16)
    before = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent: merging twice adds the delta once
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base_layer(x), unmerged, atol=ATOL, rtol=0)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


def test_merge_without_keeping_original_subtracts_the_same_delta():
    layer = _layer()
    before = layer.base_layer.weight.detach().clone()
    layer.merge(keep_original=False)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)


def test_set_scale_while_merged_refuses_nothing_and_stays_exact():
    layer = _layer()
    x = torch.randn(4, 16)
    layer.merge()
    layer.set_scale(0.3)
    reference = _layer()  # same seed: same weights, unmerged
    reference.set_scale(0.3)
    torch.testing.assert_close(layer(x), reference(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="finite"):
        layer.set_scale(float("nan"))


def test_merge_refuses_non_finite_delta_and_leaves_weight_untouched():
    layer = _layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_fold_reproduces_the_delta():
    layer = _layer()
    layer.set_scale(0.6)
    down, up = layer.fold()
    expected = 0.6 * (8.0 / 4) * layer.lora_B @ layer.lora_M @ layer.lora_A
    torch.testing.assert_close((8.0 / 4) * up @ down, expected.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), expected.detach(), atol=ATOL, rtol=0)


def test_low_precision_base_keeps_fp32_adapters_and_merges_in_fp32():
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = _layer(base=base)
    assert all(p.dtype == torch.float32 for p in (layer.lora_A, layer.lora_M, layer.lora_B))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    fp32 = base.weight.float() + layer.delta_weight()
    layer.merge()
    # one bf16 rounding of the fp32 sum, not a sum of rounded terms
    assert torch.equal(layer.base_layer.weight, fp32.to(torch.bfloat16))


def test_gradients_reach_a_m_b_only_and_base_stays_put():
    layer = _layer()
    base_before = [p.detach().clone() for p in layer.base_layer.parameters()]
    layer.base_layer.requires_grad_(False)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(8, 16)).pow(2).mean().backward()
    for p in (layer.lora_A, layer.lora_M, layer.lora_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.base_layer.parameters())
    m_before = layer.lora_M.detach().clone()
    opt.step()
    assert not torch.equal(layer.lora_M, m_before)
    assert all(torch.equal(a, b) for a, b in zip(base_before, layer.base_layer.parameters(), strict=True))


def test_pointwise_conv_matches_the_linear_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, kernel_size=1)
    layer = _layer(base=conv)
    x = torch.randn(2, 16, 3, 3)
    tokens = x.permute(0, 2, 3, 1)  # channels last: a 1x1 conv is a linear map per pixel
    W = conv.weight[:, :, 0, 0]
    expected = tokens @ W.T + conv.bias + 2.0 * tokens @ (layer.lora_B @ layer.lora_M @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected.permute(0, 3, 1, 2), atol=ATOL, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), expected.permute(0, 3, 1, 2), atol=ATOL, rtol=0)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(16, 12), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("bad", [dict(kind="dora"), dict(mixer_init="zeros"), dict(rank=0), dict(rank=99)])
def test_bad_arguments_are_refused(bad):
    args = dict(rank=4, alpha=4.0) | bad
    with pytest.raises(ValueError):
        MoSLoRALinear(nn.Linear(16, 12), **args)
    with pytest.raises(TypeError, match="nn.Linear"):
        MoSLoRALinear(nn.Conv2d(4, 4, 3), rank=2, alpha=2)
