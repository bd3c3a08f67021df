"""The fold: our adapter, and the standard LoRA files it folds into, read back by diffusers' own loaders."""

import logging

import pytest
import torch
from conftest import generate, randomize_adapters
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from moslora_diffusion import AdapterConfig, attach_to_pipeline, merge_pipeline, set_pipeline_scale
from moslora_diffusion.formats.lora import (
    DIFFUSERS_WEIGHT_NAME,
    combine,
    diffusers_state_dict,
    export_pipeline_loras,
    fold_pipeline,
)
from moslora_diffusion.moslora.pipeline import model_module_name

IMAGE_ATOL = 1e-4  # 2-step 32x32 images in [0, 1]; observed differences are ~1e-6 (fp32 reassociation)


def _adapted(model_dir, kind="moslora"):
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    attach_to_pipeline(pipe, AdapterConfig(kind=kind, rank=4, alpha=8), text_targets="attn")
    randomize_adapters(pipe)
    return pipe


def _peft_lora_layers(pipe) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for c in ("unet", "text_encoder", "text_encoder_2")
               if getattr(pipe, c, None) is not None for m in getattr(pipe, c).modules())


def _load_quietly(model_dir, lora_path, caplog):
    """Loads a LoRA with diffusers and fails on any warning (dropped or unexpected keys)."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        pipe.load_lora_weights(lora_path)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, problems
    return pipe


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_folded_exports_load_in_diffusers_and_match_our_adapter(tiny_dirs, family, tmp_path, caplog):
    pipe = _adapted(tiny_dirs[family])
    n_adapters = sum(len(v) for v in fold_pipeline(pipe).values())
    for scale in (0.5, 1.0):
        set_pipeline_scale(pipe, scale)
        ours = generate(pipe)
        out = tmp_path / f"s{scale}"
        written = export_pipeline_loras(pipe, diffusers_folder=out, kohya_path=out / "kohya.safetensors")
        assert written["diffusers"].name == DIFFUSERS_WEIGHT_NAME
        for path in (out, written["kohya"]):
            loaded = _load_quietly(tiny_dirs[family], path, caplog)
            assert _peft_lora_layers(loaded) == n_adapters  # every adapter arrived, none dropped
            assert abs(generate(loaded) - ours).max() <= IMAGE_ATOL, (scale, path)
    base = generate(DiffusionPipeline.from_pretrained(tiny_dirs[family]))
    assert abs(ours - base).max() > 1e-2  # the adapter really changes the image


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_merged_pipeline_equals_unmerged(tiny_dirs, family):
    pipe = _adapted(tiny_dirs[family])
    set_pipeline_scale(pipe, 0.8)
    unmerged = generate(pipe)
    merge_pipeline(pipe)
    assert abs(generate(pipe) - unmerged).max() <= IMAGE_ATOL


def test_kohya_keys_names_and_real_alpha(tiny_dirs, tmp_path):
    sdxl = _adapted(tiny_dirs["sdxl"])
    path = export_pipeline_loras(sdxl, kohya_path=tmp_path / "k.safetensors")["kohya"]
    sd = load_file(path)
    prefixes = {k.split("_")[1] if k.startswith("lora_unet") else k.split("_")[1] for k in sd}
    assert {"te1", "te2", "unet"} <= prefixes
    # SDXL UNet modules use kohya's LDM naming: the tiny model's second block is input_blocks 4 and 5
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in sd)
    assert not any("down_blocks" in k for k in sd)
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {8.0}  # the real alpha, not the rank (4)
    sd1 = _adapted(tiny_dirs["sd15"])
    keys = load_file(export_pipeline_loras(sd1, kohya_path=tmp_path / "k1.safetensors")["kohya"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)


def test_lora_kind_folds_to_its_own_weights(tiny_sd15_dir):
    """With M = I the fold is the identity: up = B, down = A (the LoRA baseline exports unchanged)."""
    pipe = _adapted(tiny_sd15_dir, kind="lora")
    folded = fold_pipeline(pipe)
    for component, layers in folded.items():
        for module, lora in layers.items():
            model = getattr(pipe, component)
            layer = model.get_submodule(model_module_name(model, module))
            assert torch.equal(lora.down, layer.lora_A.detach()) and torch.equal(lora.up, layer.lora_B.detach())


def test_combined_adapters_equal_the_sum_of_deltas(tiny_sd15_dir):
    first, second = _adapted(tiny_sd15_dir), DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    torch.manual_seed(1)
    attach_to_pipeline(second, AdapterConfig(rank=2, alpha=1), text_targets="attn")
    randomize_adapters(second, seed=1)
    folds = [fold_pipeline(first), {c: {m: lora.scaled(0.4) for m, lora in layers.items()}
                                    for c, layers in fold_pipeline(second).items()}]
    combined = diffusers_state_dict(combine(folds))
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    got = combined[f"{module}.lora_B.weight"] @ combined[f"{module}.lora_A.weight"]
    name = module.removeprefix("unet.")
    expected = first.unet.get_submodule(name).delta_weight() + 0.4 * second.unet.get_submodule(name).delta_weight()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert combined[f"{module}.lora_A.weight"].shape[0] == 6  # ranks 4 + 2 concatenated
