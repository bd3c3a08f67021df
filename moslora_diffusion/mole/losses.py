"""The gate-balancing loss of MoLE (arXiv 2404.13628): L_balance = -log prod_i q_i = -sum_i log q_i.

q_i is expert i's gate probability averaged over the gated blocks and the batch of the current forward. Without
it the gates collapse onto one expert; -sum log q_i is smallest (N log N) when every q_i = 1/N. Unlike the
authors' code, which computes it on detached values, it keeps the gradient to the gates here. Masked experts
(weight 0 by construction) are left out.
"""

from __future__ import annotations

import torch

from .experts import MoLEError
from .model import MoLE


def expert_usage(mole: MoLE) -> torch.Tensor:
    """q: (N,) fp32, the mean over gated blocks of each block's batch-mean (and position-mean) gate weights, with
    gradient."""
    gates = list(mole.current_gates().values())
    if not gates:
        raise MoLEError("no learned gates were computed since clear_gates(): run a forward with learned (not "
                        "fixed) gates first")
    device = gates[0].device
    # (B, N) per-block gates, (B, L, N) per-position ones: each block's mean over its batch (and positions)
    return torch.stack([g.to(device).reshape(-1, g.shape[-1]).mean(dim=0) for g in gates]).mean(dim=0)


def balance_loss(mole: MoLE) -> torch.Tensor:
    """-sum_i log q_i over the unmasked experts (a scalar with gradient to every gate that ran)."""
    q = expert_usage(mole)
    return -torch.log(q[mole.keep.to(q.device)]).sum()
