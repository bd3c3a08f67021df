"""The whole-image composition methods of today, behind `compose`: weight sum, NLA and MoLE's per-block gates.

- sum: every expert's delta added at its scale s_i (an A1111 / ComfyUI LoRA stack), fused into the weights;
- nla: the same with the scales divided by N (the normalised baseline of the MoLE paper, arXiv 2404.13628);
- mole: MoLE's hooks with a gate_state (learned gates) or, without one, uniform gates.
The weights are restored exactly afterwards (FusedAdapters keeps W0; MoLE never writes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from ..generation.fusion import FusedAdapters
from ..generation.text_to_image import GenerationRequest, run_pipeline
from ..mole import Expert, attach_mole, detach_mole


def generate_weighted(pipe, experts: Sequence[Expert], request: GenerationRequest, normalise: bool
                      ) -> list[Image.Image]:
    """Images with sum_i s_i delta_i (normalise: s_i / N) fused into the pipeline's weights, then W0 back."""
    fusion = FusedAdapters(pipe)
    divisor = len(experts) if normalise else 1
    try:
        for expert in experts:
            fusion.add_folded(expert.folded, expert.scale / divisor)
        return run_pipeline(pipe, request, None)
    finally:
        for name in fusion.names():
            fusion.remove(name)


def generate_gated(pipe, experts: Sequence[Expert], request: GenerationRequest,
                   gates: Mapping[str, torch.Tensor] | None) -> tuple[list[Image.Image], dict[str, list[float]]]:
    """Images through MoLE (gates: a gate_state; None: uniform gates) and its gate report over the call."""
    mole = attach_mole(pipe, experts, gates)
    try:
        mole.reset_report()
        images = run_pipeline(pipe, request, None)
        return images, mole.gate_report()
    finally:
        detach_mole(pipe)
