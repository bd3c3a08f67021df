"""Fused adapters: exact against the unmerged MoSLoRA layers, drift-free, linear, and all-or-nothing loads."""

import random

import pytest
import torch
from conftest import generate, make_adapter
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from moslora_diffusion import AdapterError, load_adapter, set_pipeline_scale
from moslora_diffusion.formats.merge import bake_adapters
from moslora_diffusion.generation.fusion import FusedAdapters

# Fused computes (W + s*delta) x, the wrapper W x + s*(alpha/r) B M A x: equal up to fp32 rounding. Over a
# 2-step 32x32 run we measured at most 2.4e-6 in [0, 1] pixel units (the adapter itself moves pixels by 0.2-0.4).
IMAGE_ATOL = 1e-5
@pytest.fixture(scope="module")
def adapters(tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "subject": make_adapter(tiny_sd15_dir, root / "subject" / "moslora.safetensors", seed=1),
        # UNet-only, other rank and alpha, SD 1.x's 1x1-conv proj_in/proj_out too.
        "style": make_adapter(tiny_sd15_dir, root / "style.safetensors", seed=2, rank=2, alpha=4,
                              unet_targets="attn+proj", text_targets=None),
        "sdxl": make_adapter(tiny_sdxl_dir, root / "sdxl.safetensors", seed=3, text_targets=None),
    }


@pytest.fixture
def pipe(tiny_sd15_dir):
    return DiffusionPipeline.from_pretrained(tiny_sd15_dir)


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {
        f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_equals_unmerged_adapter_at_every_scale(pipe, adapters, tiny_sd15_dir):
    fused = FusedAdapters(pipe)
    fused.add("subject", adapters["subject"])
    reference = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    load_adapter(reference, adapters["subject"], scale=1.0)  # MoSLoRALinear wrappers, unmerged
    base = generate(pipe)
    for scale in (1.0, 0.5, -0.7, 2.0):
        fused.set_scales({"subject": scale})
        set_pipeline_scale(reference, scale)
        ours, theirs = generate(pipe), generate(reference)
        assert abs(ours - theirs).max() <= IMAGE_ATOL, scale
        assert abs(ours - base).max() > 1e-2  # the adapter really changes the image
    fused.set_scales({"subject": 0.0})
    assert (generate(pipe) == base).all()


def test_moving_the_scale_many_times_returns_bit_identical_base_weights(pipe, adapters):
    before = _state(pipe)
    fused = FusedAdapters(pipe)
    fused.add("subject", adapters["subject"], scale=1.0)
    fused.add("style", adapters["style"], scale=0.3)
    assert not _same(_state(pipe), before)
    rng = random.Random(0)
    for _ in range(200):
        fused.set_scales({"subject": rng.uniform(-1, 2), "style": rng.uniform(-1, 2)})
    fused.set_scales({"subject": 1.0, "style": 0.3})
    at_one = _state(pipe)
    for _ in range(50):
        fused.set_scales({"subject": rng.uniform(-1, 2)})
    fused.set_scales({"subject": 1.0})
    assert _same(_state(pipe), at_one)  # no drift: every write starts from the kept original
    fused.reset()
    assert _same(_state(pipe), before)
    fused.set_scales({"style": 1.5})
    fused.remove("style")
    fused.remove("subject")
    assert _same(_state(pipe), before) and fused.names() == []


def test_two_adapters_combine_linearly(pipe, adapters, tiny_sd15_dir):
    fused = FusedAdapters(pipe)
    fused.add("subject", adapters["subject"])
    fused.add("style", adapters["style"])
    w0 = _state(pipe)

    def delta(scales):
        fused.set_scales(scales)
        return {k: v.double() - w0[k].double() for k, v in _state(pipe).items()}

    both = delta({"subject": 0.8, "style": -0.6})
    first = delta({"subject": 0.8, "style": 0.0})
    second = delta({"subject": 0.0, "style": -0.6})
    assert any(v.abs().max() > 1e-3 for v in both.values())
    for k in both:
        assert torch.allclose(both[k], first[k] + second[k], atol=2e-6), k
    # And against an independent implementation: baking both adapters into a fresh pipeline.
    baked = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    bake_adapters(baked, [(adapters["subject"], 0.8), (adapters["style"], -0.6)])
    fused.set_scales({"subject": 0.8, "style": -0.6})
    assert abs(generate(pipe) - generate(baked)).max() <= IMAGE_ATOL


def test_only_affected_layers_are_rewritten(pipe, adapters):
    fused = FusedAdapters(pipe)
    fused.add("subject", adapters["subject"])  # UNet attn + text encoder
    fused.add("style", adapters["style"])  # UNet only
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    rewritten = fused.set_scales({"style": 0.25})
    assert rewritten == len(fused.adapters["style"].layers)
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert fused.set_scales({"style": 0.25}) == 0  # unchanged scale: nothing to do


def test_adapter_of_another_family_is_refused_and_nothing_changes(pipe, adapters):
    fused = FusedAdapters(pipe)
    fused.add("subject", adapters["subject"], scale=0.7)
    before = _state(pipe)
    with pytest.raises(AdapterError, match="trained for sdxl"):
        fused.add("xl", adapters["sdxl"], scale=1.0)
    assert fused.names() == ["subject"] and fused.scales == {"subject": 0.7}
    assert _same(_state(pipe), before)


def test_bad_files_are_refused_before_anything_changes(pipe, adapters, tmp_path):
    fused = FusedAdapters(pipe)
    before = _state(pipe)
    tensors = load_file(adapters["subject"])
    from safetensors import safe_open

    with safe_open(str(adapters["subject"]), "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.endswith("moslora_A"))
    wrong_shape = dict(tensors, **{key: torch.zeros(4, 7)})
    save_file(wrong_shape, tmp_path / "shape.safetensors", meta)
    with pytest.raises(AdapterError, match="shape mismatch"):
        fused.add("shape", tmp_path / "shape.safetensors", 1.0)
    key_b = next(k for k in tensors if k.endswith("moslora_B"))
    not_finite = dict(tensors, **{key_b: torch.full_like(tensors[key_b], float("nan"))})
    save_file(not_finite, tmp_path / "nan.safetensors", meta)
    with pytest.raises(AdapterError, match="NaN"):
        fused.add("nan", tmp_path / "nan.safetensors", 1.0)
    with pytest.raises(AdapterError, match="finite"):
        fused.add("subject", adapters["subject"], float("inf"))
    assert fused.names() == [] and _same(_state(pipe), before)
    fused.add("subject", adapters["subject"])
    with pytest.raises(AdapterError, match="already loaded"):
        fused.add("subject", adapters["subject"])
    with pytest.raises(AdapterError, match="unknown adapter"):
        fused.set_scales({"nope": 1.0})


def test_sdxl_with_both_text_encoders_fuses_exactly(tiny_sdxl_dir, tmp_path):
    path = make_adapter(tiny_sdxl_dir, tmp_path / "xl" / "moslora.safetensors", seed=5, text_targets="attn")
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    fused = FusedAdapters(pipe)
    fused.add("xl", path, scale=0.9)
    assert {key[0] for key in fused.adapters["xl"].layers} == {"unet", "text_encoder", "text_encoder_2"}
    reference = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    load_adapter(reference, path, scale=0.9)
    assert abs(generate(pipe) - generate(reference)).max() <= IMAGE_ATOL
