"""Exponential moving average of the adapter weights (fp32 shadow copies)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    """shadow <- d * shadow + (1 - d) * weight after every optimizer step.

    d warms up as min(decay, (1 + n) / (10 + n)) (as diffusers' EMAModel), so a short run is not
    dominated by the initial weights (B = 0).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for param, shadow in zip(self.params, self.shadow, strict=True):
            param.copy_(shadow)

    @contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the block, then the live weights back, bit for bit."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup, strict=True):
                    param.copy_(saved)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(tensors)} tensors, this run has {len(self.shadow)}")
        with torch.no_grad():
            for i, shadow in enumerate(self.shadow):
                shadow.copy_(tensors[str(i)])
        self.num_updates = num_updates
