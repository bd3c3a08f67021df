"""Experts one at a time on one pipeline: what LoRA Switch and LoRA Composite (Zhong et al., "Multi-LoRA
Composition for Image Generation", arXiv 2402.16843) are built from.

"Expert i alone" is the base model plus expert i's delta (times its extra scale s_i) in every layer it adapts,
its text-encoder layers included: MoLE (mole/model.py) attached with fixed one-hot gates. The pipeline's own
`encode_prompt` runs once per expert (the text encoders are cheap next to the denoising steps), and every UNet
call made for expert i reads expert i's prompt encoding, so each expert's prediction is exactly what that expert
alone would predict. Works for every pipeline family and expert file MoLE takes (SD 1.x / 2.x / XL; ours,
diffusers and kohya LoRAs). Nothing writes a weight: on exit the hooks, the two wrapped methods and the scheduler
are undone, and the pipeline computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image

from ..generation.text_to_image import GenerationRequest, make_scheduler, run_pipeline, validate_request
from ..mole.experts import MAX_EXPERTS, Expert
from ..mole.model import attach_mole, detach_mole
from .regions import CompositionError

# (positive, negative) positions in what `encode_prompt` returns: SD 1.x / 2.x (prompt_embeds,
# negative_prompt_embeds); SDXL adds (pooled_prompt_embeds, negative_pooled_prompt_embeds).
# The UNet reads the first pair as encoder_hidden_states and SDXL's second as added_cond_kwargs["text_embeds"].
_HIDDEN_PAIR, _POOLED_PAIR = 0, 2


def check_experts_given(experts: Sequence[Expert]) -> None:
    """1 to MAX_EXPERTS experts (what `load_experts(..., minimum=1)` returns)."""
    if not experts:
        raise CompositionError("no experts to compose: give at least one LoRA (a training output folder, a "
                               "moslora.safetensors, a diffusers or kohya LoRA file)")
    if len(experts) > MAX_EXPERTS:
        raise CompositionError(f"at most {MAX_EXPERTS} experts can be composed, got {len(experts)}: drop some")


class OneHotExperts:
    """MoLE with fixed one-hot gates, switched by `use(i)`, plus each expert's own prompt encoding."""

    def __init__(self, mole):
        self.mole = mole
        self.count = len(mole.experts)
        self.active: int | None = None
        self.encodings: list[tuple] = []  # per expert: what the pipeline's encode_prompt returned for it

    def use(self, index: int) -> None:
        if index != self.active:
            self.mole.set_fixed_gates([float(j == index) for j in range(self.count)])
            self.active = index

    def encode_each(self, original: Callable) -> Callable:
        """A stand-in for pipe.encode_prompt: encodes once per expert, returns expert 0's encoding."""
        def encode_prompt(*args, **kwargs):
            self.encodings = []
            for index in range(self.count):
                self.use(index)
                self.encodings.append(tuple(original(*args, **kwargs)))
            return self.encodings[0]
        return encode_prompt

    def unet(self, original: Callable, index: int, args: tuple, kwargs: dict):
        """One UNet forward with expert `index` alone: its gates and its prompt encoding."""
        self.use(index)
        return original(*args, **self.conditioning(index, kwargs))

    def conditioning(self, index: int, kwargs: dict) -> dict:
        """The UNet call's keyword arguments with expert `index`'s prompt encoding in place of expert 0's."""
        if "encoder_hidden_states" not in kwargs or not self.encodings:
            raise RuntimeError("composition needs the pipeline to encode the prompt with encode_prompt and pass "
                               "encoder_hidden_states by keyword (diffusers' SD and SDXL pipelines do)")
        out = dict(kwargs)
        out["encoder_hidden_states"] = self._swap(kwargs["encoder_hidden_states"], index, _HIDDEN_PAIR)
        added = kwargs.get("added_cond_kwargs")
        if added and "text_embeds" in added and len(self.encodings[0]) > _POOLED_PAIR:
            out["added_cond_kwargs"] = {**added, "text_embeds": self._swap(added["text_embeds"], index, _POOLED_PAIR)}
        return out

    def _swap(self, value: torch.Tensor, index: int, pair: int) -> torch.Tensor:
        """`value` is expert 0's encoding as the pipeline batched it: [negative; positive] under classifier-free
        guidance, else the positive alone. The same batching of expert `index`'s encoding."""
        positive, negative = self.encodings[0][pair], self.encodings[0][pair + 1]
        mine_positive, mine_negative = self.encodings[index][pair], self.encodings[index][pair + 1]
        if negative is not None and torch.equal(value, torch.cat([negative, positive])):
            return torch.cat([mine_negative, mine_positive])
        if torch.equal(value, positive):
            return mine_positive
        raise RuntimeError("the UNet's conditioning is not the prompt encoding as diffusers' pipelines batch it; "
                           "this pipeline cannot be composed")


def replace_attribute(obj, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Sets obj.<name> = make(current obj.<name>) on the instance; returns the undo."""
    had, before = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, make(getattr(obj, name)))

    def undo():
        if had:
            setattr(obj, name, before)
        else:
            delattr(obj, name)
    return undo


@contextmanager
def experts_one_at_a_time(pipe, experts: Sequence[Expert], unet_forward: Callable) -> Iterator[OneHotExperts]:
    """Inside the block, `pipe` encodes the prompt once per expert and its UNet calls
    `unet_forward(router, original_forward, args, kwargs)` instead of its forward.

    Raises MoLEError (one line, nothing touched) for experts that do not fit the pipeline or a pipeline that
    already has MoLE or MoSLoRA adapters attached. On exit (also after an error) the pipeline is as before."""
    check_experts_given(experts)
    mole = attach_mole(pipe, experts, minimum=1)
    router = OneHotExperts(mole)
    scheduler, undo = pipe.scheduler, []
    try:
        undo.append(replace_attribute(pipe, "encode_prompt", router.encode_each))
        undo.append(replace_attribute(pipe.unet, "forward", lambda original: (
            lambda *args, **kwargs: unet_forward(router, original, args, kwargs))))
        yield router
    finally:
        for step in reversed(undo):
            step()
        detach_mole(pipe)
        if pipe.scheduler is not scheduler:
            pipe.scheduler = scheduler


def generate_one_at_a_time(pipe, experts: Sequence[Expert], request: GenerationRequest, unet_forward: Callable,
                           on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """Images for `request` (validated first: GenerationError, one line) with the UNet routed by `unet_forward`
    (see experts_one_at_a_time); on_step runs after every denoising step (diffusers' callback_on_step_end)."""
    req = validate_request(request, [])
    check_experts_given(experts)
    with experts_one_at_a_time(pipe, experts, unet_forward):
        pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
        return run_pipeline(pipe, req, on_step)
