"""The toy base model's components: standard diffusers / transformers classes at toy sizes.

An SD 1.x-shaped pipeline (AutoencoderKL with f=4 and 4 latent channels, UNet2DConditionModel with
cross-attention, CLIPTextModel with quick_gelu, a word-level CLIP tokenizer), so everything that loads,
adapts or exports SD 1.x handles it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.tiny import load_clip_tokenizer, write_clip_tokenizer
from .subject import TOKEN
from .world import RESOLUTION, vocabulary

# DDPM's linear schedule, not SD's scaled_linear: at 16x16 latents SD's final step leaves the image mean
# visible (alpha_bar_T = 0.0047, so a flat background's mean has SNR ~1 over 256 latent pixels) and a model
# trained on it ignores the caption's background and position, reading them from the noise instead.
# Linear ends at alpha_bar_T = 4e-5.
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                 prediction_type="epsilon")


@dataclass(frozen=True)
class Architecture:
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 64 px -> 16x16x4 latents (f=4)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    # Cross-attention at every level, 16x16 included: without it the caption's position word is ignored (a
    # GPU sweep at 3000 steps: position right in 22% of held-out scenes without, 95% with; +40% step time).
    unet_attention: tuple[bool, ...] = (True, True, True)
    unet_heads: int = 2
    norm_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 2
    text_intermediate: int = 256

    @property
    def latent_size(self) -> int:
        return RESOLUTION // 2 ** (len(self.vae_channels) - 1)


def tokenizer_words() -> tuple[str, ...]:
    """The world's vocabulary plus the DreamBooth rare token: each becomes one token."""
    return vocabulary() + (TOKEN,)


def build_tokenizer(folder: Path):
    """The toy CLIP tokenizer: every vocabulary word (and "sks") a single token.

    BPE applies merges by rank, so a word whose inner letter pair is another word's (earlier) first merge
    gets split ("checkered" -> "c", "he", ...; "he" from "heart"). Moving the words that split to the front
    gives their merges priority; a few rounds settle it.
    """
    order = list(tokenizer_words())
    for _ in range(20):
        write_clip_tokenizer(folder, words=tuple(order))
        tokenizer = load_clip_tokenizer(folder)
        split = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not split:
            return tokenizer
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"could not make these words single tokens: {split}")


def build_vae(arch: Architecture):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=arch.vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=arch.norm_groups, sample_size=RESOLUTION,
    )


def build_unet(arch: Architecture):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.unet_attention))
    return UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=4, out_channels=4, block_out_channels=arch.unet_channels,
        layers_per_block=1, down_block_types=down, up_block_types=up, attention_head_dim=arch.unet_heads,
        cross_attention_dim=arch.text_hidden, norm_num_groups=arch.norm_groups,
    )


def build_text_encoder(arch: Architecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=arch.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER, clip_sample=False)


def assemble_pipeline(vae, unet, text_encoder, tokenizer):
    """A StableDiffusionPipeline (DDIM sampling, no safety checker) from trained components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
