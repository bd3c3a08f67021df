"""Attaching adapters to real (tiny) diffusers UNets and CLIP text encoders, and taking them off."""

import pytest
import torch
from conftest import randomize_adapters
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from moslora_diffusion import AdapterConfig, AdapterError, adapters, attach, attach_to_pipeline, detach
from moslora_diffusion.moslora.inject import (
    TEXT_TARGET_PRESETS,
    UNET_TARGET_PRESETS,
    adapter_parameters,
    resolve_targets,
)


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    return sample, torch.tensor([10]), hidden, kwargs


def _unet_out(unet):
    sample, t, hidden, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        return unet(sample, t, hidden, **kwargs).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_default_targets_and_only_adapters_train(tiny_dirs, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    found = attach_to_pipeline(pipe, AdapterConfig(rank=4), text_targets="attn")
    expected_unet = [n for n, _ in pipe.unet.named_modules()
                     if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert sorted(found["unet"]) == sorted(expected_unet) and len(expected_unet) > 0
    text_encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert sorted(found) == sorted(["unet", *text_encoders])
    for name in text_encoders:
        assert len(found[name]) == 4 * getattr(pipe, name).config.num_hidden_layers
    for module in (pipe.unet, *(getattr(pipe, n) for n in text_encoders)):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_M", "lora_B") for n in trainable)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_detach_restores_bit_identical_state_dict(tiny_dirs, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "text_encoder")}
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=4), unet_targets="all", text_targets="attn+mlp")
    randomize_adapters(pipe)
    assert not torch.equal(_unet_out(pipe.unet), _unet_out(DiffusionPipeline.from_pretrained(tiny_dirs[family]).unet))
    adapters(pipe.unet)["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].merge()  # merged ones too
    detach(pipe.unet)
    detach(pipe.text_encoder)
    for name in ("unet", "text_encoder"):
        after = getattr(pipe, name).state_dict()
        assert list(after) == list(before[name])
        assert all(torch.equal(after[k], before[name][k]) for k in after)


def test_attaching_twice_is_an_error(tiny_sd15_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    attach(pipe.unet, AdapterConfig(), ["to_q"])
    with pytest.raises(AdapterError, match="already has MoSLoRA adapters"):
        attach(pipe.unet, AdapterConfig(), ["to_k"])
    with pytest.raises(AdapterError, match="already has MoSLoRA adapters"):
        attach_to_pipeline(pipe, AdapterConfig())


def test_unknown_targets_are_an_error(tiny_sd15_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    with pytest.raises(AdapterError, match="no adaptable layer"):
        attach(pipe.unet, AdapterConfig(), ["not_a_layer"])
    assert not adapters(pipe.unet)
    assert resolve_targets("to_q, to_v", UNET_TARGET_PRESETS) == ("to_q", "to_v")
    assert resolve_targets("attn+mlp", TEXT_TARGET_PRESETS)[-1] == "fc2"


def test_sd1_conv_projections_are_adapted(tiny_sd15_dir):
    """SD 1.x proj_in/proj_out are 1x1 convolutions; the optional targets must cover them."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    found = attach(pipe.unet, AdapterConfig(rank=2), UNET_TARGET_PRESETS["attn+proj"])
    assert any(name.endswith("proj_in") and layer.is_conv for name, layer in found.items())


def test_works_under_every_attention_processor(tiny_sd15_dir):
    """We adapt projection layers, not processors: the classic and SDPA processors agree."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    base = _unet_out(pipe.unet)
    attach(pipe.unet, AdapterConfig(rank=4), UNET_TARGET_PRESETS["attn"])
    randomize_adapters(pipe)
    outputs = []
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        pipe.unet.set_attn_processor(processor)
        outputs.append(_unet_out(pipe.unet))
    assert (outputs[0] - base).abs().max() > 1e-3
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_gradients_reach_adapters_only_and_base_is_unchanged_after_a_step(tiny_dirs, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    attach(pipe.unet, AdapterConfig(rank=4), UNET_TARGET_PRESETS["attn"])
    randomize_adapters(pipe)
    base_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    params = adapter_parameters(pipe.unet)
    opt = torch.optim.AdamW(params, lr=1e-2)
    sample, t, hidden, kwargs = _unet_inputs(pipe.unet)
    pipe.unet(sample, t, hidden, **kwargs).sample.pow(2).mean().backward()
    for layer in adapters(pipe.unet).values():
        for p in (layer.lora_A, layer.lora_M, layer.lora_B):
            assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    opt.step()
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
