"""Per-forward adapter weights (step_weights.py): same values and gradients as per-call weights, fewer ops,
never stale after an optimizer step, safe under non-reentrant gradient checkpointing and deepcopy."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.common import count_aten_ops
from moslora_diffusion.models.tiny import build_tiny_pipeline
from moslora_diffusion.moslora import step_weights
from moslora_diffusion.moslora.inject import AdapterConfig, adapter_parameters, adapters, attach

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def adapted_unet(kind: str = "moslora", seed: int = 0):
    unet = build_tiny_pipeline("sd15").unet
    attach(unet, AdapterConfig(kind=kind, rank=4, alpha=8), TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B and a perturbed mixer: no equality below is trivially true
        for layer in adapters(unet).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.lora_M.add_(torch.randn(layer.lora_M.shape, generator=g) * 0.1 * (kind == "moslora"))
    return unet


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g))


def output_and_grads(unet, inputs):
    for p in adapter_parameters(unet):
        p.grad = None
    out = unet(*inputs).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in adapter_parameters(unet)]


def cached_layers(unet) -> int:
    return sum(layer.step_weights is not None for layer in adapters(unet).values())


@pytest.mark.parametrize("kind", ["moslora", "lora"])
def test_cached_weights_match_per_call_weights(kind):
    unet, inputs = adapted_unet(kind), unet_inputs()
    fast_out, fast_grads = output_and_grads(unet, inputs)
    assert cached_layers(unet) == len(adapters(unet)) > 0
    step_weights.uninstall(unet)  # every layer computes its own weights again
    slow_out, slow_grads = output_and_grads(unet, inputs)
    assert cached_layers(unet) == 0
    base = copy.deepcopy(unet)
    for layer in adapters(base).values():
        layer.scale = 0.0
    assert (fast_out - base(*inputs).sample.detach()).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-5, atol=1e-6)
    for fast, slow in zip(fast_grads, slow_grads, strict=True):
        assert slow.abs().max() > 0
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_matches_per_call_weights():
    unet, inputs = adapted_unet(), unet_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = unet(*inputs).sample.float()
    assert next(iter(adapters(unet).values())).step_weights.dtype == torch.bfloat16
    step_weights.uninstall(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = unet(*inputs).sample.float()
    assert (fast - slow).norm() / slow.norm() < 2e-2  # bf16 rounding, one vs two products


def test_cached_forward_runs_fewer_ops():
    unet, inputs = adapted_unet(), unet_inputs()

    def ops() -> int:
        return count_aten_ops(lambda: unet(*inputs).sample.sum().backward())
    fast = ops()
    step_weights.uninstall(unet)
    slow = ops()
    layers = len(adapters(unet))
    assert slow - fast >= layers, (fast, slow, layers)  # at least one op saved per adapted layer


def test_optimizer_step_makes_cached_weights_stale():
    unet, inputs = adapted_unet(), unet_inputs()
    optimizer = torch.optim.SGD(adapter_parameters(unet), lr=0.5)
    output_and_grads(unet, inputs)
    optimizer.step()
    name, layer = next((n, m) for n, m in adapters(unet).items() if not m.is_conv)
    x = torch.randn(3, layer.lora_A.shape[1])
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.scaling * x @ (layer.lora_B @ layer.lora_M @ layer.lora_A).T
    assert not layer.step_weights.usable(layer, torch.float32)  # built before the step
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-6)


def test_no_grad_weights_are_not_used_for_training():
    unet, inputs = adapted_unet(), unet_inputs()
    with torch.no_grad():
        unet(*inputs)
    layer = next(m for m in adapters(unet).values() if not m.is_conv)
    x = torch.randn(3, layer.lora_A.shape[1])
    layer(x).sum().backward()  # called directly: no pre-hook, so the no-grad weights must be bypassed
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = unet_inputs()
    reference = adapted_unet()
    _, expected = output_and_grads(reference, inputs)
    checkpointed = adapted_unet()
    checkpointed.enable_gradient_checkpointing()  # diffusers: non-reentrant
    checkpointed.train()
    _, grads = output_and_grads(checkpointed, inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_deepcopy_after_a_training_forward():
    unet, inputs = adapted_unet(), unet_inputs()
    out, _ = output_and_grads(unet, inputs)
    clone = copy.deepcopy(unet)
    assert cached_layers(clone) == 0
    torch.testing.assert_close(clone(*inputs).sample.detach(), out, rtol=1e-5, atol=1e-6)


def test_detach_removes_the_hook():
    from moslora_diffusion.moslora.inject import detach

    unet = adapted_unet()
    detach(unet)
    assert not hasattr(unet, step_weights.HOOK_ATTRIBUTE) and not unet._forward_pre_hooks
