"""Prior preservation without class images (--prior_source base_model): the base model's own prediction is the
class rows' target.

For every instance row, a class row on the SAME noisy latents and timestep, prompted with the row's caption with
the instance prompt replaced by the class prompt ("a photo of sks dog on grass" -> "a photo of a dog on grass"),
or with the class prompt alone when the caption does not contain the instance prompt. Its target is the UNet's
prediction for that prompt with every adapter (UNet and text encoders) at scale 0, which MoSLoRALinear skips
exactly: the frozen base model's output, without grad. Its prediction is the adapted model's, with grad, in the
same forward as the instance rows (DDP allows one forward per backward), and diffusion_loss scores the class rows
as it scores class images: loss = instance loss + prior_loss_weight * MSE(class rows). This is ai-toolkit's
"differential output preservation" and OneTrainer's prior preservation without regularisation images.

Nothing new is drawn: the class rows reuse the instance rows' draws, so a resumed run and N processes compute
what one uninterrupted run computes (objective.py's row layout has one group).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ...moslora.layer import MoSLoRALinear
from ...moslora.pipeline import pipeline_adapters
from ...moslora.token_vectors import token_vectors_off
from ..model.components import BaseModel
from ..model.conditioning import PromptConditioning
from ..settings.config import TrainConfig

# The SDXL size conditioning of a row (B, 2) each: a class row repeats its instance row's.
SIZE_KEYS = ("original_sizes", "crop_top_lefts", "target_sizes")


def preservation_prompt(caption: str, instance_prompt: str, class_prompt: str) -> str:
    """The caption with the instance prompt replaced by the class prompt, else the class prompt."""
    instance, subject_class = instance_prompt.strip(), class_prompt.strip()
    return caption.replace(instance, subject_class) if instance in caption else subject_class


@contextmanager
def adapters_off(layers: list[MoSLoRALinear]) -> Iterator[None]:
    """Every layer at scale 0 (the adapter path skipped exactly) for the with block; the scales come back even
    when the block raises."""
    scales = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.set_scale(0.0)
        yield
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.set_scale(scale)


class OutputPreservation:
    """Adds the class rows to a micro-batch, with the base model's predictions as their targets.

    conditioning: the run's; reused for the targets when it caches prompts (frozen text encoders carry no
    adapters, so their embeddings are the base model's). With --train_text_encoder the targets get their own
    cache, always filled with the adapters off: the base encoders are frozen, so one encoding per prompt.
    """

    def __init__(self, config: TrainConfig, base: BaseModel, conditioning: PromptConditioning):
        self.instance_prompt, self.class_prompt = config.instance_prompt, config.class_prompt
        self.base = base
        self.layers = [layer for layers in pipeline_adapters(base.pipe).values() for layer in layers.values()]
        self.base_conditioning = conditioning if conditioning.cache else PromptConditioning(
            base.family, base.tokenizers, base.text_encoders, conditioning.device, cache=True)

    def prompts(self, captions: list[str]) -> list[str]:
        return [preservation_prompt(c, self.instance_prompt, self.class_prompt) for c in captions]

    @torch.no_grad()
    def base_prediction(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The base model's prediction (rows, C, h, w) for batch["prompts"]: every adapter off and, with pivotal
        tuning, the trigger word's original embedding rows (a caption may name the word outside the instance
        prompt), no grad, the unwrapped UNet (a no-grad forward needs no DDP hooks)."""
        dtype = self.base.weight_dtype
        with adapters_off(self.layers), token_vectors_off(self.base.pipe):
            conditioning = self.base_conditioning.unet_kwargs(batch, dtype)
            return self.base.unet(noisy.to(dtype), timesteps, **conditioning, return_dict=False)[0]

    def add_class_rows(self, batch: dict, noisy: torch.Tensor, target: torch.Tensor,
                       timesteps: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, noisy, target, timesteps) of b instance rows -> the same of 2b rows, [instances, classes].

        noisy: (b, C, h, w) noisy latents; target: (b, C, h, w); timesteps: (b,). The class rows' target is
        `base_prediction`; batch["num_instance"] stays b, so diffusion_loss weights them by prior_loss_weight.
        """
        class_batch = {**batch, "prompts": self.prompts(batch["prompts"])}
        base_target = self.base_prediction(class_batch, noisy, timesteps)
        doubled = {key: torch.cat([batch[key], batch[key]]) for key in SIZE_KEYS if key in batch}
        rows = {**batch, **doubled, "prompts": batch["prompts"] + class_batch["prompts"]}
        if "masks" in batch:  # --masked_loss: the class rows preserve the whole image, as class images would
            rows["masks"] = torch.cat([batch["masks"], torch.ones_like(batch["masks"])])
        return (rows, torch.cat([noisy, noisy]), torch.cat([target, base_target.to(target.dtype)]),
                torch.cat([timesteps, timesteps]))
