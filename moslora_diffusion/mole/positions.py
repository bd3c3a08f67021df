"""Spatial MoLE gates: the block's gate evaluated at every latent position instead of once per block.

A per-block gate weighs every pixel of a block the same, so one expert wins the whole feature map. Evaluated per
position, the same gate (same parameters: W (N, C + D), b, T) reads that position's features

    f(p) = concat(LayerNorm(hidden[:, :, p]) (C), LayerNorm(max over tokens of the prompt) (D))
    g(p) = softmax((W f(p) + b) / T)                                 (B, L, N), L = h * w

and every adapted layer of the block with positions (self-attention, feed-forward, proj_in / proj_out, the
cross-attention's to_q and to_out) weighs its experts per position. The cross-attention's to_k / to_v act on the
prompt's tokens, which have no position: they get the gate averaged over the block's positions (B, N). W = 0,
b = 0 gives 1/N everywhere (NLA), a one-hot gate the expert alone, as for block gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import pooled_tokens

GRANULARITIES = ("block", "position")


def position_features(hidden: torch.Tensor, context: torch.Tensor | None, text_dim: int) -> torch.Tensor:
    """hidden (B, C, h, w) (or (B, L, C)), context (B, T, D) or None -> (B, L, C + D) fp32."""
    image = hidden.float().flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden.float()
    image = F.layer_norm(image, image.shape[-1:])
    if context is None:
        text = image.new_zeros(*image.shape[:2], text_dim)
    else:
        pooled = pooled_tokens(context)
        text = F.layer_norm(pooled, pooled.shape[-1:])[:, None, :].expand(image.shape[0], image.shape[1], -1)
    return torch.cat([image, text], dim=-1)


def layer_weights(weights: torch.Tensor, grid: tuple[int, int], x: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """A block's per-position gate (B, L, N) as the weights of one of its layers, for that layer's input x:
    (B, h, w, N) for a convolution on (B, C, h, w), (B, L, N) for a linear layer on (B, L, C), else the mean over
    positions (B, N) (inputs without the block's positions: the prompt's tokens)."""
    h, w = grid
    if is_conv and tuple(x.shape[-2:]) == (h, w):
        return weights.view(weights.shape[0], h, w, weights.shape[-1])
    if not is_conv and x.dim() == 3 and x.shape[1] == h * w:
        return weights
    return weights.mean(dim=1)
