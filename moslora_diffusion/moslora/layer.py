"""The MoSLoRA layer: y = W x + s * (alpha / r) * B M A x, wrapped around an existing projection.

A (r x in) projects down, the mixer M (r x r) mixes the r subspaces, B (out x r) projects up
(arXiv 2406.11909). With M = I frozen this is exactly plain LoRA, so the `lora` kind is the honest
baseline through the same code. Because B M A = (B M) A, a trained layer folds exactly into a plain
rank-r LoRA with up = B M: every export goes through `fold()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import SCALE, Range, check_number, number_problems

KINDS = ("moslora", "lora")
MIXER_INITS = ("kaiming", "orthogonal", "identity")
# The numbers that shape an adapter; MoSLoRALinear and AdapterConfig check the same table.
ADAPTER_RANGES = {"rank": Range(0, open_lower=True, integer=True), "alpha": Range(0, open_lower=True, optional=True),
                  "dropout": Range(0, 1, open_upper=True)}


def check_adapter_numbers(rank, alpha, dropout) -> None:
    """Raises ValueError naming every rank / alpha / dropout that is not finite and in range."""
    problems = number_problems({"rank": rank, "alpha": alpha, "dropout": dropout}, ADAPTER_RANGES)
    if problems:
        raise ValueError("; ".join(problems))


def _is_pointwise_conv(module: nn.Module) -> bool:
    """SD 1.x's proj_in/proj_out are 1x1 convolutions: per-pixel linear maps we can adapt the same way."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), "valid"))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_pointwise_conv(module)


class MoSLoRALinear(nn.Module):
    """Wraps `base` (an nn.Linear or a 1x1 nn.Conv2d) in place; the base weights stay frozen.

    Adapter parameters are fp32 whatever the base dtype; the adapter path runs in the dtype of the
    base output (the compute dtype), so an fp16/bf16 base pays no fp32 matmuls.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, kind: str = "moslora",
                 mixer_init: str = "kaiming", dropout: float = 0.0):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"MoSLoRA adapts nn.Linear or 1x1 nn.Conv2d layers, not {type(base).__name__}")
        if kind not in KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}; choose one of {KINDS}")
        if mixer_init not in MIXER_INITS:
            raise ValueError(f"unknown mixer init {mixer_init!r}; choose one of {MIXER_INITS}")
        check_adapter_numbers(rank, alpha, dropout)
        self.is_conv = isinstance(base, nn.Conv2d)
        in_features = base.in_channels if self.is_conv else base.in_features
        out_features = base.out_channels if self.is_conv else base.out_features
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 1..{min(in_features, out_features)} for this layer, got {rank}")
        self.base_layer = base
        self.kind, self.rank, self.alpha = kind, int(rank), float(alpha)
        self.mixer_init = "identity" if kind == "lora" else mixer_init
        self.scale = 1.0
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        # The plain-LoRA baseline keeps M = I frozen (and skips it in forward: exactly B A).
        self.lora_M = nn.Parameter(torch.empty(rank, rank, device=device, dtype=torch.float32),
                                   requires_grad=kind == "moslora")
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.step_weights = None  # set by step_weights.StepWeights before each forward of the adapted model
        self._weight_before_merge: torch.Tensor | None = None
        self._merged_delta: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Same A init as PEFT's LoRA; B = 0 so training starts exactly at the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.mixer_init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_M, a=math.sqrt(5))
        elif self.mixer_init == "orthogonal":
            nn.init.orthogonal_(self.lora_M)
        else:
            self.lora_M.copy_(torch.eye(self.rank))

    @property
    def scaling(self) -> float:
        return self.scale * self.alpha / self.rank

    def effective_down(self) -> torch.Tensor:
        """M A (r x in), formed once per call: r*r*in flops instead of r*r per token."""
        return self.lora_A if self.kind == "lora" else self.lora_M @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.scale == 0:
            return y
        dtype = y.dtype  # the compute dtype (autocast or the base's own)
        h = self.dropout(x).to(dtype)
        cached = self.step_weights
        if cached is not None and cached.usable(self, dtype):
            down, up = cached.down, cached.up
        elif self.is_conv or self.kind == "lora" or x.numel() // x.shape[-1] >= self.lora_A.shape[1]:
            down, up = self.effective_down().to(dtype), self.lora_B.to(dtype)
        else:
            # Few tokens (deep UNet levels): mixing r activations (T*r*r) beats forming M A (r*r*in).
            down, up = None, self.lora_B.to(dtype)
            h = F.linear(F.linear(h, self.lora_A.to(dtype)), self.lora_M.to(dtype))
        if self.is_conv:
            return y.add(F.conv2d(F.conv2d(h, down[:, :, None, None]), up[:, :, None, None]), alpha=self.scaling)
        if down is not None:
            h = F.linear(h, down)
        # One GEMM adds the scaled up-projection into y: no separate scale and add kernels.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), up.t(), alpha=self.scaling)
        return out.view(y.shape)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the equivalent plain LoRA of the same rank and alpha, in fp32.

        down = A, up = s * B M: the mixer and the runtime scale are baked into up, so a reader that
        applies (alpha / r) * up @ down gets exactly this layer's delta.
        """
        with torch.no_grad():
            up = self.lora_B.float() if self.kind == "lora" else self.lora_B.float() @ self.lora_M.float()
            return self.lora_A.detach().float().clone(), (up * self.scale).contiguous()

    def delta_weight(self) -> torch.Tensor:
        """s * (alpha / r) * B M A in fp32, shaped like the base weight."""
        down, up = self.fold()
        delta = (up @ down) * (self.alpha / self.rank)
        return delta.view_as(self.base_layer.weight)

    def _finite_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("refusing to merge: the adapter delta has NaN or inf values (a diverged training run?)")
        return delta

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Adds the delta into the base weight (computed in fp32). Idempotent.

        keep_original=True keeps a copy of the weight so `unmerge` restores it bit for bit; False keeps
        only the fp32 delta and unmerge subtracts it (no full-precision copy of a low-precision weight).
        """
        if self.merged:
            return
        delta = self._finite_delta()
        weight = self.base_layer.weight
        self._weight_before_merge = weight.detach().clone() if keep_original else None
        self._merged_delta = None if keep_original else delta
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self._weight_before_merge is not None:
            weight.copy_(self._weight_before_merge)
        else:
            weight.copy_((weight.float() - self._merged_delta).to(weight.dtype))
        self._weight_before_merge = self._merged_delta = None
        self.merged = False

    @torch.no_grad()
    def bake(self) -> nn.Module:
        """Adds the delta into the base weight for good and returns the base layer (for export).

        Keeps neither the original weight nor the delta, so baking a whole UNet costs one layer's
        fp32 delta at a time.
        """
        self.unmerge()
        delta = self._finite_delta()
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))
        return self.base_layer

    def set_scale(self, scale: float) -> None:
        """Changes s; a merged layer is re-merged at the new scale (exact: from the kept original)."""
        scale = check_number("adapter scale", scale, SCALE)
        if scale == self.scale:
            return
        was_merged = self.merged
        self.unmerge()
        self.scale = scale
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, alpha={self.alpha}, mixer_init={self.mixer_init}"
