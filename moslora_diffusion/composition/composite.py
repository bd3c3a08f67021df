"""LoRA Composite (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv 2402.16843, section 3.2).

At every denoising step each of the N experts makes its own classifier-free-guided noise prediction and the
step uses their mean:

    eps = (1/N) sum_i [ u_i + w (c_i - u_i) ]       u_i, c_i: expert i alone, without / with the prompt

"Expert i alone" as in one_at_a_time.py (its UNet delta, the prompt encoded with its text-encoder delta). We run
the UNet once per expert on the pipeline's batch ([negative; positive] under guidance) and hand the pipeline the
mean of those outputs, [mean u_i; mean c_i]; the pipeline then guides it. What this relies on: diffusers' guidance
u + w (c - u) = (1 - w) u + w c is linear in (u, c), so guiding the means equals the mean of the guided
predictions (equal up to fp32 rounding) - true for the SD 1.x / 2.x / XL pipelines with guidance_rescale = 0, as
run_pipeline calls them (a rescaled guidance is not linear, and this equality would not hold). N UNet forwards
per step: Composite costs about N times the base model. (The authors' released code encodes the prompt once
with every LoRA's text-encoder layers active; here each expert's prediction uses its own encoding, so that each
term of the mean is exactly that expert's prediction. The two agree for experts without text-encoder layers.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..generation.text_to_image import GenerationRequest
from ..mole.experts import Expert
from .one_at_a_time import generate_one_at_a_time


def unet_sample(output) -> torch.Tensor:
    """The UNet's prediction, whether it returned a tuple (return_dict=False) or a UNet2DConditionOutput."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output, sample: torch.Tensor):
    """`output` (as the UNet returned it) holding `sample` instead."""
    return (sample,) if isinstance(output, tuple) else type(output)(sample=sample)


def mean_forward(router, original, args, kwargs):
    """One UNet call of the pipeline: every expert alone on the same inputs, outputs averaged (in fp32)."""
    total = output = None
    for index in range(router.count):
        output = router.unet(original, index, args, kwargs)
        sample = unet_sample(output).float()
        total = sample if total is None else total + sample
    mean = (total / router.count).to(unet_sample(output).dtype)
    return with_sample(output, mean)


def generate_composite(pipe, experts: Sequence[Expert], request: GenerationRequest) -> list[Image.Image]:
    """Images (request.num_images, request.width x request.height) composed by LoRA Composite.

    experts: 1..8 experts from `load_experts(pipe, paths, minimum=1)`. Raises GenerationError (bad request),
    CompositionError (no experts) or MoLEError (experts that do not fit the pipeline), one line each, before the
    pipeline is touched. The pipeline is left exactly as it was."""
    return generate_one_at_a_time(pipe, experts, request, mean_forward)
