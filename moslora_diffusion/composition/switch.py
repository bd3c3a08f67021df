"""LoRA Switch (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv 2402.16843, section 3.1).

One expert is active at a time and the active one rotates every `every` denoising steps, in the order given:

    active expert at denoising step k (0-based) = (k // every) mod N

"Active" means the expert alone (one_at_a_time.py: its UNet delta, and the prompt encoded with its text-encoder
delta). A step runs one UNet forward as the base model does, so Switch costs what one LoRA costs. A step is one
iteration of the pipeline's denoising loop (what diffusers' callback_on_step_end counts). With one expert, Switch
is that expert alone.

Where the authors' released code differs from the paper's text, we follow the text: their callback switches after
step k when k > 0 and k % every == 0 (so their first turn lasts every + 1 steps), and it encodes the prompt once
with the first LoRA's text-encoder layers for every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from ..checks import Range, check_number
from ..generation.text_to_image import MAX_STEPS, GenerationRequest, validate_request
from ..mole.experts import Expert
from .one_at_a_time import check_experts_given, generate_one_at_a_time
from .regions import CompositionError

DEFAULT_EVERY = 5  # the paper's switching interval


def active_expert(step: int, every: int, count: int) -> int:
    """The expert (index into the experts as given) active at denoising step `step` (0-based)."""
    return (step // every) % count


def check_every(every, count: int, steps: int) -> int:
    """`every` as an int in 1..MAX_STEPS such that each of the `count` experts is active for at least one of the
    `steps` steps; CompositionError (one line) otherwise."""
    every = check_number("every (steps between switches)", every, Range(1, MAX_STEPS, integer=True),
                         CompositionError)
    if count > 1 and (count - 1) * every >= steps:
        most = (steps - 1) // (count - 1)
        fix = f"use every <= {most}" if most >= 1 else f"use at least {count} steps"
        raise CompositionError(f"with {steps} steps and a switch every {every} steps, the last of the {count} "
                               f"experts is never active: {fix}")
    return every


def default_every(count: int, steps: int) -> int:
    """The paper's interval (5), shortened so that each of `count` experts gets a turn in `steps` steps."""
    return max(1, min(DEFAULT_EVERY, (steps - 1) // max(1, count - 1)))


def generate_switch(pipe, experts: Sequence[Expert], request: GenerationRequest,
                    every: int | None = None) -> list[Image.Image]:
    """Images (request.num_images, request.width x request.height) composed by LoRA Switch.

    experts: 1..8 experts from `load_experts(pipe, paths, minimum=1)`, in switching order; every: denoising steps
    per expert turn (None: the paper's 5, shortened to `default_every` when the steps are too few for every
    expert to get a turn). Raises GenerationError (bad request), CompositionError (no experts, a bad
    `every`) or MoLEError (experts that do not fit the pipeline), one line each, before the pipeline is touched.
    The pipeline is left exactly as it was."""
    req = validate_request(request, [])
    check_experts_given(experts)
    every = check_every(default_every(len(experts), req.steps) if every is None else every, len(experts), req.steps)
    step = [0]

    def forward(router, original, args, kwargs):
        return router.unet(original, active_expert(step[0], every, router.count), args, kwargs)

    def next_step():
        step[0] += 1

    return generate_one_at_a_time(pipe, experts, req, forward, next_step)
