"""Export round trips, with diffusers as the independent reader of what we write.

Tolerance for images: max abs diff <= 1e-4 on 2-step 32x32 np images in [0, 1] (seeded generator, fp32).
Merged and unmerged differ only by fp32 rounding (measured ~2e-6); the adapter itself moves pixels by 0.17-0.33.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import generate, make_adapter
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from moslora_diffusion import load_adapter
from moslora_diffusion.formats.export_targets import ExportError, export, parse_adapter_spec
from moslora_diffusion.models.loading import load_pipeline
from moslora_diffusion.moslora import inject
from moslora_diffusion.moslora.pipeline import detach_from_pipeline, model_components

IMAGE_TOL = 1e-4


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_sd15_dir, tiny_sd2_dir, tiny_sdxl_dir):
    """family -> (base folder, adapter file); SD 2.x is the v-prediction tiny model."""
    root = tmp_path_factory.mktemp("export-cases")
    bases = {"sd15": tiny_sd15_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}
    return {fam: (base, make_adapter(base, root / f"{fam}.safetensors", seed=1)) for fam, base in bases.items()}


@pytest.fixture(scope="module")
def second_sd15_adapter(cases, tmp_path_factory):
    """Another shape of adapter: rank 2, orthogonal mixer, also on SD 1.x's 1x1-conv proj_in/proj_out."""
    return make_adapter(cases["sd15"][0], tmp_path_factory.mktemp("second") / "b.safetensors", seed=2,
                        rank=2, alpha=3, mixer_init="orthogonal", unet_targets="attn+proj", text_targets=None)


def _pipeline_class(family):
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_merged_exports_generate_like_base_plus_adapter(cases, family, tmp_path):
    base, adapter = cases[family]
    reference = load_pipeline(base)
    base_images = generate(reference)
    load_adapter(reference, adapter, scale=0.8)
    unmerged = generate(reference)
    assert _max_diff(unmerged, base_images) > 1e-2  # the adapter really changes the picture

    single = export(base, [(adapter, 0.8)], "merged-single-file", tmp_path / "merged.safetensors", dtype="fp32")
    folder = export(base, [(adapter, 0.8)], "merged-diffusers", tmp_path / "merged", dtype="fp32")
    from_single = _pipeline_class(family).from_single_file(str(single), config=str(base))
    from_folder = _pipeline_class(family).from_pretrained(folder)
    assert _max_diff(generate(from_single), unmerged) <= IMAGE_TOL
    assert _max_diff(generate(from_folder), unmerged) <= IMAGE_TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.safetensors"]  # no temp left


def test_single_file_metadata_names_what_was_merged(cases, tmp_path):
    base, adapter = cases["sd2"]
    out = export(base, [(adapter, 0.8)], "merged-single-file", tmp_path / "sd2.safetensors", dtype="bf16")
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"  # the tiny SD 2.x predicts v
    assert meta["modelspec.prediction_type"] == "v" and "v_pred" in keys
    assert "sd2.safetensors x0.8" in meta["modelspec.description"] and meta["modelspec.title"] == "sd2"
    record = json.loads(meta["moslora_merge"])
    assert record["base"] == base.name and record["dtype"] == "bf16"
    assert record["adapters"] == [{"name": "sd2.safetensors", "scale": 0.8, "kind": "moslora", "rank": 4,
                                   "alpha": 8.0, "instance_prompt": "a photo of sks dog"}]
    assert dtypes == {"BF16"}


def _expected_weights(base, adapters):
    """base + sum(scale_i * delta_i), each delta taken at scale 1 from a fresh attach."""
    pipe = load_pipeline(base)
    expected = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in model_components(pipe).items()}
    for path, scale in adapters:
        load_adapter(pipe, path, scale=1.0)
        for name, model in model_components(pipe).items():
            for module, layer in inject.adapters(model).items():
                expected[name][f"{module}.weight"] += scale * layer.delta_weight()
        detach_from_pipeline(pipe)
    return expected


def test_two_adapters_merge_to_base_plus_scaled_deltas(cases, second_sd15_adapter, tmp_path):
    base, first = cases["sd15"]
    adapters = [(first, 0.7), (second_sd15_adapter, 0.4)]
    out = export(base, adapters, "merged-single-file", tmp_path / "two.safetensors", dtype="fp32")
    merged = StableDiffusionPipeline.from_single_file(str(out), config=str(base))
    expected = _expected_weights(base, adapters)
    untouched = load_pipeline(base)
    changed = 0
    for name, weights in expected.items():
        actual, original = getattr(merged, name).state_dict(), getattr(untouched, name).state_dict()
        for key, value in weights.items():
            # fp32: the merge rounds once per adapter, the reference once overall.
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
            changed += not torch.equal(actual[key], original[key])
    # Tiny SD 1.x: 6 transformers x (attn1, attn2) x to_q/k/v/out, 2 CLIP layers x q/k/v/out, and the
    # second adapter's proj_in/proj_out (1x1 convs) of the 6 transformers; nothing else moved.
    assert changed == 6 * 2 * 4 + 2 * 4 + 6 * 2


def test_several_adapters_as_one_lora_concatenate_ranks(cases, second_sd15_adapter, tmp_path):
    base, first = cases["sd15"]
    out = export(base, [(first, 0.7), (second_sd15_adapter, 0.4)], "lora-diffusers", tmp_path / "lora",
                 dtype="fp32")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        shape = f.get_slice("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")
        assert shape.get_shape()[0] == 4 + 2


def test_sdxl_kohya_lora_uses_ldm_block_names(cases, tmp_path):
    base, adapter = cases["sdxl"]
    out = export(base, [(adapter, 1.0)], "lora-kohya", tmp_path / "xl.safetensors")
    with safe_open(str(out), framework="pt") as f:
        unet_keys = [k for k in f.keys() if k.startswith("lora_unet_")]
    assert unet_keys and all("_input_blocks_" in k or "_middle_block_" in k or "_output_blocks_" in k
                             for k in unet_keys)


@pytest.mark.parametrize("text, expected", [
    ("run/out", ("run/out", 1.0)),
    ("run/out:0.8", ("run/out", 0.8)),
    ("a:b/c.safetensors:-1.5e-1", ("a:b/c.safetensors", -0.15)),
])
def test_adapter_spec_takes_only_a_trailing_number_as_scale(text, expected):
    path, scale = parse_adapter_spec(text)
    assert (str(path), scale) == expected


def test_adapter_spec_existing_path_with_colon_wins(tmp_path):
    odd = tmp_path / "run:2"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == (odd, 1.0)
    assert parse_adapter_spec(f"{odd}:0.5") == (odd, 0.5)


@pytest.mark.parametrize("text, message", [("run:abc", "scale not a number"), ("run:nan", "finite")])
def test_adapter_spec_rejects_bad_scales(text, message):
    with pytest.raises(ExportError, match=message):
        parse_adapter_spec(text)
