"""transformers CLIP text encoders -> the layouts original SD checkpoints store them in.

- OpenAI CLIP (SD 1.x, SDXL's first encoder): the original checkpoints hold the transformers model
  itself, so names stay as they are under `<prefix>text_model.`; only the prefix is added.
- OpenCLIP (SD 2.x, SDXL's second encoder): `transformer.resblocks.N` with `ln_1`/`ln_2`, `mlp.c_fc` /
  `mlp.c_proj`, q/k/v fused into one `attn.in_proj_weight` (3*hidden, hidden) and bias, and the
  projection stored as a (hidden, proj) matrix multiplied from the right, i.e. transposed.

Recent transformers (>= 5.6) dropped the `text_model.` wrapper from CLIPTextModel's state dict while
CLIPTextModelWithProjection keeps it; `_inner_names` accepts both and yields the wrapper-less names.
"""

from __future__ import annotations

import torch

OPENCLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                      "embeddings.position_embedding.weight": "positional_embedding",
                      "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_QKV = ("q_proj", "k_proj", "v_proj")


def _inner_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors by their name inside the text model (`encoder.layers.0...`);
    `text_projection.weight` keeps its name (it sits beside the text model)."""
    return {key.removeprefix("text_model."): value for key, value in state_dict.items()}


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP under `prefix` (`cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`)."""
    out = {}
    for name, tensor in _inner_names(state_dict).items():
        out[prefix + (name if name == "text_projection.weight" else "text_model." + name)] = tensor
    return out


def _open_clip_layer(name: str) -> str:
    """`encoder.layers.3.mlp.fc1.weight` -> `transformer.resblocks.3.mlp.c_fc.weight` (q/k/v excluded)."""
    _, _, index, rest = name.split(".", 3)
    for old, new in OPENCLIP_LAYER_NAMES.items():
        if rest.startswith(old + "."):
            return f"transformer.resblocks.{index}.{new}{rest[len(old):]}"
    raise KeyError(f"text encoder parameter {name!r} has no place in the OpenCLIP layout")


def _fused_qkv(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """q, k, v of each layer stacked in that order into in_proj_weight (3h, h) / in_proj_bias (3h,)."""
    fused = {}
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"encoder.layers.{i}.self_attn.{p}.{kind}") for p in _QKV]
            fused[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return fused


def clip_to_open_clip(state_dict: dict[str, torch.Tensor], num_layers: int, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout under `prefix` (`cond_stage_model.model.` or `conditioner.embedders.1.model.`).

    num_layers: the encoder's `config.num_hidden_layers`. Raises KeyError for a tensor with no place,
    so a model we do not understand is never written with parts missing.
    """
    tensors = _inner_names(state_dict)
    out = _fused_qkv(tensors, num_layers)
    for name, tensor in tensors.items():
        if name == "text_projection.weight":  # nn.Linear (proj, hidden) -> x @ P with P (hidden, proj)
            out["text_projection"] = tensor.T.contiguous()
        elif name in OPENCLIP_TOP_NAMES:
            out[OPENCLIP_TOP_NAMES[name]] = tensor
        elif name.startswith("encoder.layers."):
            out[_open_clip_layer(name)] = tensor
        else:
            raise KeyError(f"text encoder parameter {name!r} has no place in the OpenCLIP layout")
    return {prefix + key: value for key, value in out.items()}
