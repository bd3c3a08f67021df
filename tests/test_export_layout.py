"""The single-file layout of full-size SD 1.5 / SD 2.1 / SDXL, checked against diffusers' own reader.

Models are built on the meta device (nothing allocated): we write the original-layout state dict, hand
it to diffusers' single-file conversion functions, and require exactly the diffusers models' keys and
shapes back. diffusers' model-type detection must also recognise what we wrote.
"""

from __future__ import annotations

import pytest
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)

from moslora_diffusion.formats.keymaps import ldm_unet_key, unet_block_prefixes, vae_block_prefixes
from moslora_diffusion.formats.single_file import TEXT_ENCODER_LAYOUTS, single_file_state_dict
from moslora_diffusion.models.full_size import CONFIGS, build_components

# Tensor counts of what we write, per part (observed; the SD 1.5 total is the 1131 keys of the original
# v1-5 checkpoint less its `position_ids` buffer, SDXL's is the original 2515 less `position_ids` and
# OpenCLIP's `logit_scale`, neither of which a pipeline holds).
EXPECTED_COUNTS = {
    "sd1": {"unet": 686, "vae": 248, "text_encoder": 196, "total": 1130},
    "sd2": {"unet": 686, "vae": 248, "text_encoder": 280, "total": 1214},  # 23 OpenCLIP layers, q/k/v fused
    "sdxl": {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 389, "total": 2513},
}
DIFFUSERS_MODEL_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}
# Shapes the original layout has (and diffusers' detection relies on), where it differs from diffusers'.
LAYOUT_SHAPES = {
    "sd1": {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias": (3072,),
            "cond_stage_model.model.positional_embedding": (77, 1024)},
    "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def layout(request):
    components = build_components(request.param)
    return request.param, components, single_file_state_dict(request.param, components)


def _assert_same_keys_and_shapes(converted: dict, model) -> None:
    expected = model.state_dict()
    assert set(converted) == set(expected), (sorted(set(expected) - set(converted))[:5],
                                             sorted(set(converted) - set(expected))[:5])
    wrong = [k for k in expected if tuple(converted[k].shape) != tuple(expected[k].shape)]
    assert not wrong, wrong[:5]


def test_counts_and_original_shapes(layout):
    family, components, ckpt = layout
    counts = {"unet": sum(k.startswith("model.diffusion_model.") for k in ckpt),
              "vae": sum(k.startswith("first_stage_model.") for k in ckpt)}
    for name, _, prefix in TEXT_ENCODER_LAYOUTS[family]:
        counts[name] = sum(k.startswith(prefix) for k in ckpt)
    counts["total"] = len(ckpt)
    assert counts == EXPECTED_COUNTS[family]
    assert {k: tuple(ckpt[k].shape) for k in LAYOUT_SHAPES[family]} == LAYOUT_SHAPES[family]
    assert all(t.device.type == "meta" for t in ckpt.values())  # nothing was allocated
    assert infer_diffusers_model_type(ckpt) == DIFFUSERS_MODEL_TYPE[family]


def test_unet_and_vae_convert_back_exactly(layout):
    family, components, ckpt = layout
    unet, vae = components["unet"], components["vae"]
    _assert_same_keys_and_shapes(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet)
    _assert_same_keys_and_shapes(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae)


def test_text_encoders_convert_back_exactly(layout):
    family, components, ckpt = layout
    for name, kind, prefix in TEXT_ENCODER_LAYOUTS[family]:
        model = components[name]
        if kind == "clip":
            converted = convert_ldm_clip_checkpoint(ckpt)  # strips both SD 1.x and SDXL prefixes
            converted = {k: v for k, v in converted.items() if not k.startswith("conditioner.")}
        else:
            converted = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 CLIPTextModel, as diffusers handles it
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        _assert_same_keys_and_shapes(converted, model)


def test_block_tables_follow_the_config():
    # SDXL: three levels, attention from level 1 on; the upsampler sits after the attention.
    sdxl = unet_block_prefixes(CONFIGS["sdxl"]["unet"])
    assert sdxl["down_blocks.1.attentions.1"] == "input_blocks.5.1"
    assert sdxl["up_blocks.0.upsamplers.0"] == "output_blocks.2.2"
    assert ldm_unet_key("mid_block.resnets.1.time_emb_proj.weight", sdxl) == "middle_block.2.emb_layers.1.weight"
    assert ldm_unet_key("down_blocks.0.resnets.0.conv_shortcut.bias", sdxl) == \
        "input_blocks.1.0.skip_connection.bias"
    vae = vae_block_prefixes({"down_block_types": ["D"] * 3, "up_block_types": ["U"] * 3, "layers_per_block": 1})
    assert vae["decoder.up_blocks.0.resnets.1"] == "decoder.up.2.block.1"  # LDM numbers up blocks in reverse
    assert vae["decoder.up_blocks.0.upsamplers.0"] == "decoder.up.2.upsample"
    with pytest.raises(KeyError, match="no place"):
        ldm_unet_key("class_embedding.linear_1.weight", sdxl)
