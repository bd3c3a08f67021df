"""A diffusers SD pipeline's weights as ONE state dict in the original single-file layout.

What A1111 and ComfyUI load as a checkpoint, and what diffusers' `from_single_file` converts back:
- SD 1.x / 2.x (LDM): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), text encoder
  under `cond_stage_model.transformer.text_model.*` (1.x) or `cond_stage_model.model.*` (2.x, OpenCLIP);
- SDXL (SGM): the same UNet/VAE prefixes, `conditioner.embedders.0.transformer.*` (CLIP-L) and
  `conditioner.embedders.1.model.*` (OpenCLIP-G).
Every name comes from the models' own configs (keymaps), so tiny test models take the same path as
full-size ones. Tensors are not copied except where the layout needs a new one (fused q/k/v,
transposed projection); the VAE attention's 1x1-conv shape is a view.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .keymaps import ldm_unet_key, ldm_vae_key, unet_block_prefixes, vae_block_prefixes
from .text_encoder_layout import clip_to_ldm, clip_to_open_clip

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# family -> ((pipeline attribute, layout, prefix), ...) for its text encoders
TEXT_ENCODER_LAYOUTS = {
    "sd1": (("text_encoder", "clip", "cond_stage_model.transformer."),),
    "sd2": (("text_encoder", "open_clip", "cond_stage_model.model."),),
    "sdxl": (("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "open_clip", "conditioner.embedders.1.model.")),
}
# ComfyUI reads this (empty) marker to run a checkpoint as v-prediction; every other reader ignores it.
V_PREDICTION_MARKER = "v_pred"


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    prefixes = unet_block_prefixes(unet_config)
    return {UNET_PREFIX + ldm_unet_key(key, prefixes): value for key, value in state_dict.items()}


def _is_vae_attention_matrix(ldm_key: str, tensor: torch.Tensor) -> bool:
    return ".attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.dim() == 2


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """The LDM VAE's mid-block attention is built of 1x1 convolutions: its q/k/v/proj_out weights are
    (C, C, 1, 1) where diffusers has Linear (C, C)."""
    prefixes = vae_block_prefixes(vae_config)
    out = {}
    for key, value in state_dict.items():
        ldm_key = ldm_vae_key(key, prefixes)
        out[VAE_PREFIX + ldm_key] = value[:, :, None, None] if _is_vae_attention_matrix(ldm_key, value) else value
    return out


def text_encoder_to_ldm(model: nn.Module, layout: str, prefix: str) -> dict[str, torch.Tensor]:
    state_dict = model.state_dict()
    if layout == "clip":
        return clip_to_ldm(state_dict, prefix)
    return clip_to_open_clip(state_dict, model.config.num_hidden_layers, prefix)


def single_file_state_dict(family: str, components: Mapping[str, nn.Module],
                           prediction_type: str = "epsilon") -> dict[str, torch.Tensor]:
    """family: "sd1" | "sd2" | "sdxl"; components: {"unet", "vae", "text_encoder"[, "text_encoder_2"]}
    (a pipeline's modules, or meta-device models for layout checks). Raises KeyError for any weight
    with no place in the layout rather than writing a checkpoint with parts missing."""
    if family not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(f"no single-file layout for model family {family!r}")
    unet, vae = components["unet"], components["vae"]
    tensors = unet_to_ldm(unet.state_dict(), unet.config)
    tensors.update(vae_to_ldm(vae.state_dict(), vae.config))
    for name, layout, prefix in TEXT_ENCODER_LAYOUTS[family]:
        tensors.update(text_encoder_to_ldm(components[name], layout, prefix))
    if prediction_type == "v_prediction":
        tensors[V_PREDICTION_MARKER] = torch.tensor([])
    return tensors
