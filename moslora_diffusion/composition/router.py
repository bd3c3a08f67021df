"""Spatial routing: each expert's delta applied only where its region is, in every adapted layer.

Given per-image shares w (B, N, H, W) at latent size (regions.share_weights: sum over experts <= 1), every
adapted layer with positions adds

    y(p) = W x(p) + sum_i w_i(p) * s_i * up_i (down_i x(p))

with w resized to the layer's resolution (a transformer block's (h, w) from its token count, a convolution's from
its input), so an expert's delta is exactly 0 wherever its share is 0. Layers without positions (the resnets' time
projections, the time / text embeddings) get each expert's share averaged over the image.

Cross-attention is different: to_k / to_v act on the prompt's tokens, which have no position, so weighting those
deltas per position confines nothing. Each cross-attention therefore runs once per branch: the base branch (no
expert, the global prompt as the base text encoder reads it) and one branch per expert (that expert at full scale
in to_q / to_k / to_v / to_out and in the text encoders, reading its region prompt or the global prompt), and each
position reads the blend of what the branches give it:

    out(p) = out_base(p) + sum_i w_i(p) * (out_i(p) - out_base(p))

(exactly out_base where every share is 0). The pipeline's own attention processor computes every branch, so every
attention backend keeps working; nothing is written into the weights, and `detach` restores the processors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..mole import Expert
from ..mole.model import LayerExperts, check_pipeline
from ..moslora.pipeline import model_module_name
from .regions import resize_weights

ATTRIBUTE = "_moslora_spatial_router"


class SpatialRouter:
    """Hooks experts into a pipeline with per-position shares. Build it with `attach_router`; set the shares
    (`set_shares`) and the branch contexts (`set_contexts`) before each generation."""

    def __init__(self, pipe, experts: Sequence[Expert], components: dict[str, nn.Module]):
        self.pipe, self.experts = pipe, list(experts)
        self.scales = torch.tensor([e.scale for e in experts], dtype=torch.float32)
        self.layers = []
        for key in sorted({key for e in experts for key in e.layers}):
            model = components[key[0]]
            module = model.get_submodule(model_module_name(model, key[1]))
            self.layers.append((key, module, LayerExperts(experts, key, "", isinstance(module, nn.Conv2d))))
        self.cross_attentions = [m for m in components["unet"].modules()
                                 if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]
        self.shares: torch.Tensor | None = None  # (B_images, N, H, W) at latent size, fp32
        self.contexts: list[torch.Tensor | None] = []  # per branch (0: base, 1 + i: expert i), as the UNet gets it
        self.branch: int | None = None  # the branch a cross-attention (or the text encoder) is computing
        self.whole_branch = False  # latent blend: `branch` holds for a whole UNet forward (no per-attention blend)
        self.observers: list = []  # callables(attn, hidden, context, branch) (the automatic masks listen here)
        self._handles, self._processors = [], {}

    # -- state of one generation -------------------------------------------------------------------------------
    def set_shares(self, shares: torch.Tensor) -> None:
        """(B_images, N, H, W) fp32 shares at latent size (sum over experts <= 1 at every position)."""
        self.shares = shares.float()
        self._resized: dict[tuple, torch.Tensor] = {}  # (batch, h, w, device) -> shares: every layer reuses them

    def set_contexts(self, contexts: Sequence[torch.Tensor | None]) -> None:
        """The encoder hidden states of each branch (None: the one the UNet gets), batch as the UNet's."""
        self.contexts = list(contexts)

    def shares_at(self, batch: int, height: int, width: int) -> torch.Tensor:
        """(batch, N, height, width): the shares resized, repeated over the guidance halves of the batch."""
        key = (batch, height, width)
        if key not in self._resized:
            shares = resize_weights(self.shares, height, width)
            if batch % shares.shape[0]:
                raise RuntimeError(f"a batch of {batch} for shares of {shares.shape[0]} images")
            self._resized[key] = shares.repeat(batch // shares.shape[0], 1, 1, 1)
        return self._resized[key]

    def grid(self, length: int) -> tuple[int, int]:
        """The (h, w) of a block whose token count is `length`: the latent halved (rounding up) until it fits."""
        h, w = self.shares.shape[-2:]
        while h * w > length:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != length:
            raise RuntimeError(f"{length} tokens fit no resolution of the {tuple(self.shares.shape[-2:])} latent")
        return h, w

    def position_shares(self, x: torch.Tensor, is_conv: bool) -> torch.Tensor:
        """Per-position shares for a layer input: (B, L, N) for (B, L, C), (B, h, w, N) for a conv's (B, C, h, w),
        (B, N) (the image average) for an input without positions."""
        if is_conv:
            return self.shares_at(x.shape[0], *x.shape[-2:]).permute(0, 2, 3, 1)
        if x.dim() == 3:
            h, w = self.grid(x.shape[1])
            return self.shares_at(x.shape[0], h, w).flatten(2).transpose(1, 2)
        return self.shares_at(x.shape[0], *self.shares.shape[-2:]).mean(dim=(2, 3))

    # -- hooks -------------------------------------------------------------------------------------------------
    def _weights(self, component: str, x: torch.Tensor, is_conv: bool) -> torch.Tensor:
        n = len(self.experts)
        if self.branch is not None:  # inside a cross-attention branch or a text encoding: one expert or none
            one_hot = torch.zeros(1, n)
            if self.branch > 0:
                one_hot[0, self.branch - 1] = 1.0
            return one_hot * self.scales
        if component != "unet":
            raise RuntimeError("the text encoder ran outside a branch: encode prompts with `encode_branches`")
        return self.position_shares(x, is_conv) * self.scales.to(x.device)

    def _layer_hook(self, component: str, experts: LayerExperts, module, args, output):
        if self.branch == 0:
            return output  # the base branch: no expert
        x = args[0]
        return output + experts.delta(x, output.dtype, self._weights(component, x, experts.is_conv).to(x.device))

    def install(self) -> None:
        for (component, _), module, experts in self.layers:
            hook = (lambda c, e: lambda m, a, o: self._layer_hook(c, e, m, a, o))(component, experts)
            self._handles.append(module.register_forward_hook(hook))
        for attn in self.cross_attentions:
            self._processors[attn] = attn.processor
            attn.set_processor(BranchedCrossAttention(self, attn.processor))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn, processor in self._processors.items():
            attn.set_processor(processor)
        self._processors.clear()


class BranchedCrossAttention:
    """A cross-attention processor that runs the original processor once per branch and blends per position."""

    def __init__(self, router: SpatialRouter, original):
        self.router, self.original = router, original

    def _run(self, branch: int, attn, hidden, context, **kwargs) -> torch.Tensor:
        self.router.branch = branch
        try:
            for observe in self.router.observers:
                observe(attn, hidden, context, branch)
            return self.original(attn, hidden, encoder_hidden_states=context, **kwargs)
        finally:
            self.router.branch = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        router = self.router
        kwargs["attention_mask"] = attention_mask
        if router.whole_branch:  # latent blend: this forward is one branch, its context the UNet's
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)
        base = self._run(0, attn, hidden_states, encoder_hidden_states, **kwargs)
        shares = router.position_shares(hidden_states, False)  # (B, L, N); hidden_states (B, L, C)
        out = base
        for i in range(len(router.experts)):
            share = shares[..., i:i + 1]
            if not bool((share > 0).any()):
                continue  # this expert has no region at this resolution
            context = router.contexts[i + 1] if len(router.contexts) > i + 1 else None
            context = encoder_hidden_states if context is None else context.to(hidden_states.device)
            expert_out = self._run(i + 1, attn, hidden_states, context, **kwargs)
            out = out + share.to(out.dtype) * (expert_out - base)
        return out


def attached_router(pipe) -> SpatialRouter | None:
    return getattr(pipe, ATTRIBUTE, None)


def attach_router(pipe, experts: Sequence[Expert]) -> SpatialRouter:
    """Checks (as MoLE: family, modules, shapes, nothing attached, unfused q/k/v) and hooks the experts in;
    the pipeline's weights are never written. MoLEError before anything is touched."""
    if attached_router(pipe) is not None:
        raise RuntimeError("this pipeline already has a spatial router attached")
    router = SpatialRouter(pipe, experts, check_pipeline(pipe, experts, minimum=1))  # one subject in one place
    router.install()
    setattr(pipe, ATTRIBUTE, router)
    return router


def detach_router(pipe) -> None:
    """Removes every hook and restores the attention processors: the pipeline computes exactly what it did."""
    router = attached_router(pipe)
    if router is not None:
        router.remove()
        delattr(pipe, ATTRIBUTE)
