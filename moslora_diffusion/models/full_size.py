"""Full-size SD 1.5 / SD 2.1 / SDXL architectures from their public configs, without any download.

For key-layout checks the models are built on the meta device (nothing allocated, built in seconds);
for benchmarks they get cheap random weights. Real weights are never needed: the export's names,
shapes, time and memory depend on the architecture only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
_SD_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# {family: {"unet": UNet2DConditionModel kwargs, "vae": AutoencoderKL kwargs, text encoder name: CLIPTextConfig
# kwargs}}, as in the public config.json files of stable-diffusion-v1-5/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
CONFIGS = {
    "sd1": {"unet": dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8, sample_size=64),
            "vae": dict(_SD_VAE, sample_size=512), "text_encoder": _CLIP_L},
    "sd2": {"unet": dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), sample_size=96,
                         use_linear_projection=True),
            "vae": dict(_SD_VAE, sample_size=768),
            # diffusers keeps 23 of OpenCLIP-H's 24 layers: SD 2.x conditions on the penultimate one.
            "text_encoder": dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, hidden_act="gelu", projection_dim=512)},
    "sdxl": {"unet": dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                          cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128),
             "vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
             "text_encoder": _CLIP_L,
             "text_encoder_2": dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, hidden_act="gelu", projection_dim=1280)},
}


def build_components(family: str) -> dict[str, torch.nn.Module]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} with parameters on the meta device (buffers
    such as CLIP's position ids stay real, as accelerate's init_empty_weights leaves them)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = CONFIGS[family]
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
        if "text_encoder_2" in configs:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return models


@torch.no_grad()
def materialize_random(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Gives every meta parameter real storage in `dtype`, filled with N(0, 0.02): allocated straight
    in the target dtype, so an fp16 SDXL never exists in fp32 (a default init would take minutes)."""
    from accelerate.utils import set_module_tensor_to_device

    generator = torch.Generator().manual_seed(seed)
    model.to(dtype)  # free on meta; otherwise accelerate casts each filled value back to the meta dtype
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)
        set_module_tensor_to_device(model, name, "cpu", value=value)
    return model.requires_grad_(False).eval()


def build_random_pipeline(family: str, dtype: torch.dtype = torch.float16, seed: int = 0):
    """A full-size diffusers pipeline of the family with random weights (SD 1.5 fp32: 4.3 GB of RAM,
    SDXL fp16: 7 GB). Its tokenizer is byte-level (see tiny.py): enough to run, not to generate well."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from .tiny import load_clip_tokenizer, write_clip_tokenizer

    models = {name: materialize_random(m, dtype, seed) for name, m in build_components(family).items()}
    with tempfile.TemporaryDirectory(prefix="moslora-tok-") as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = load_clip_tokenizer(Path(tmp))
    if family == "sdxl":
        return StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                         scheduler=EulerDiscreteScheduler())
    return StableDiffusionPipeline(**models, tokenizer=tokenizer, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
