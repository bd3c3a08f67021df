"""MoLE gates: one per block, a softmax over the experts with a learnable temperature.

Blocks (the paper's best granularity, Table 9: block-wise gates):
- UNet: every `Transformer2DModel` (diffusers `down_blocks.i.attentions.j`, `mid_block.attentions.0`,
  `up_blocks.i.attentions.j`; the LDM SpatialTransformer `input_blocks.N.1`). Every adapted layer inside it
  (attention projections, proj_in / proj_out, feed-forward) shares its gate.
- Text encoders: every CLIP encoder layer `text_model.encoder.layers.N` that holds an adapted layer.
- A layer adapted outside every block (a resnet's 1x1 shortcut, a time-embedding or text-projection Linear,
  which some kohya LoRAs adapt) is **ungated**: it gets the constant weight 1/N over the unmasked experts (the
  NLA weights), reported as the pseudo-block `ungated`. Such a layer sees no prompt-dependent feature its
  gate could read the way a block's gate does.
Only blocks holding at least one adapted layer get a gate.

Gate (per sample, so the two halves of a classifier-free-guidance batch get their own weights):

    g = softmax((W f + b) / T)  over the experts,   T = exp(log_temperature)

where f does not depend on resolution or prompt length: for a UNet block
f = concat(LayerNorm(mean over H, W of the block input (B, C, H, W)), LayerNorm(max over tokens of the
prompt embedding (B, L, D))), for a text-encoder layer f = LayerNorm(mean over the unmasked tokens of its input
(B, L, D)), or the max over tokens when the encoder gets no mask (pooled_tokens says why: padding). LayerNorm
without affine parameters, so a gate has (C + D) * N + N + 1 parameters (a few thousand).
W = 0, b = 0, T = 1 at init: every gate starts uniform (1/N), i.e. at the NLA composition.
The paper's gate instead reads the experts' block outputs; see the README ("Composing subjects: MoLE").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..moslora.folded import LayerKey
from ..moslora.pipeline import canonical_module_name

UNGATED = "ungated"
_TEXT_LAYER_PARENT = "text_model.encoder.layers"


@dataclass(frozen=True)
class Block:
    """A gated block: `name` is "<component>.<canonical module path>" (the key in a MoLE file)."""

    name: str
    component: str
    module: str  # canonical path, e.g. down_blocks.1.attentions.0 or text_model.encoder.layers.3
    kind: str  # "unet" (Transformer2DModel) or "text" (CLIP encoder layer)
    image_dim: int  # C, the block input's channels (0 for a text layer)
    text_dim: int  # D, the prompt embedding (UNet) or hidden (text layer) width

    @property
    def features(self) -> int:
        return self.image_dim + self.text_dim


class Gate(nn.Module):
    """softmax((W f + b) / T) over N experts; f: (B, features) fp32 -> (B, N) fp32."""

    def __init__(self, features: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, features))
        self.bias = nn.Parameter(torch.zeros(experts))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features.float(), self.weight, self.bias) / self.log_temperature.exp()

    def forward(self, features: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: (N,) bool; masked experts get weight 0 and the rest are renormalised (softmax over kept logits)."""
        logits = self.logits(features)
        if keep is not None:
            logits = logits.masked_fill(~keep.to(logits.device), float("-inf"))
        return torch.softmax(logits, dim=-1)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:])


def token_validity(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """(B, L) bool of the tokens a CLIP layer attends to, from its attention mask, or None (all tokens).

    The layer gets a 4-D mask (B, 1, L, L), additive (0 = attend) or boolean (True = attend), possibly combined
    with the causal mask; its last query row attends to every unpadded token.
    """
    if mask is None or mask.dim() != 4 or mask.shape[-1] != length:
        return None
    row = mask[:, 0, -1, :]
    valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return valid.expand(batch, length)


def pooled_tokens(hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, D) -> (B, D) fp32: the mean over the valid tokens when a mask says which they are, else the max
    over tokens. SD pipelines pad every prompt to 77 tokens and pass no mask: a mean over all 77 is mostly
    padding (on the toy base two prompts that differ in their trigger word and noun pooled to cosine 0.993,
    no signal a gate can route on), while the max keeps what the prompt's own tokens add (cosine 0.768)."""
    hidden = hidden.float()
    if valid is None:
        return hidden.amax(dim=1)
    weights = valid.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def unet_block_features(hidden: torch.Tensor, context: torch.Tensor | None, text_dim: int) -> torch.Tensor:
    """hidden (B, C, H, W) (or (B, T, C)), context (B, L, D) or None -> (B, C + D) fp32."""
    image = hidden.float().mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.float().mean(dim=1)
    if context is None:
        text = image.new_zeros(image.shape[0], text_dim)
    else:
        text = _normalised(pooled_tokens(context)).expand(image.shape[0], -1)
    return torch.cat([_normalised(image), text], dim=-1)


def text_layer_features(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """hidden (B, L, D) with the layer's attention mask -> (B, D) fp32."""
    valid = token_validity(attention_mask, hidden.shape[0], hidden.shape[1])
    return _normalised(pooled_tokens(hidden, valid))


def _candidate_blocks(components: dict[str, nn.Module]) -> dict[str, tuple[Block, nn.Module]]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            canonical = canonical_module_name(model, name) if name else name
            if component == "unet" and isinstance(module, Transformer2DModel):
                block = Block(f"unet.{name}", "unet", name, "unet", int(module.config.in_channels),
                              int(module.config.cross_attention_dim or 0))
            elif component != "unet" and canonical.rpartition(".")[0] == _TEXT_LAYER_PARENT:
                block = Block(f"{component}.{canonical}", component, canonical, "text", 0,
                              int(module.layer_norm1.normalized_shape[0]))
            else:
                continue
            found[block.name] = (block, module)
    return found


def find_blocks(components: dict[str, nn.Module], layer_keys) -> tuple[list[tuple[Block, nn.Module]],
                                                                       dict[LayerKey, str]]:
    """The gated blocks (with their modules) that hold at least one of `layer_keys`, in model order, and the
    block name of every layer key (UNGATED for a layer outside every block)."""
    candidates = _candidate_blocks(components)
    by_component: dict[str, list[Block]] = {}
    for block, _ in candidates.values():
        by_component.setdefault(block.component, []).append(block)
    assignment = {}
    for component, module in layer_keys:
        inside = [b for b in by_component.get(component, []) if module.startswith(b.module + ".")]
        assignment[(component, module)] = max(inside, key=lambda b: len(b.module)).name if inside else UNGATED
    used = set(assignment.values())
    blocks = [candidates[name] for name in candidates if name in used]
    return blocks, assignment
