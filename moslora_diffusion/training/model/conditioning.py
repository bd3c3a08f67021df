"""What the UNet is conditioned on, per model family: the ONE place training code tells SD 1.x/2.x from SDXL.

- SD 1.x / 2.x: one CLIP text encoder; the UNet gets its last hidden state (B, 77, D).
- SDXL: two encoders; the UNet gets both penultimate hidden states concatenated (B, 77, 768 + 1280),
  plus `added_cond_kwargs`: the second encoder's pooled projection (B, 1280) and the six
  micro-conditioning numbers (original h, w, crop top, left, target h, w) per image (B, 6).
  Its VAE overflows in fp16, so it stays fp32 unless a fixed VAE is given.

With frozen text encoders every distinct prompt is encoded once and looked up afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.families import SDXL, Family


def vae_dtype(family: Family, weight_dtype: torch.dtype, custom_vae: bool) -> torch.dtype:
    """SDXL's own VAE produces NaNs in fp16 (hence the fp16-fix VAE); the others are fine in weight dtype."""
    if family is SDXL and not custom_vae and weight_dtype == torch.float16:
        return torch.float32
    return weight_dtype


def tokenizer_names(family: Family) -> tuple[str, ...]:
    """Pipeline attributes of the tokenizers, in the order of `family.text_encoders`."""
    return tuple(name.replace("text_encoder", "tokenizer") for name in family.text_encoders)


@dataclass
class PromptEmbeddings:
    hidden: torch.Tensor  # (B, 77, D): cross-attention context
    pooled: torch.Tensor | None  # (B, D2) on SDXL, else None


class PromptConditioning:
    """prompts (+ SDXL size conditioning) -> the UNet's keyword arguments.

    text_encoders: the modules to call, in family order (DDP-wrapped ones when they are trained).
    cache: encode each distinct prompt once (only valid when the text encoders are frozen).
    """

    def __init__(self, family: Family, tokenizers, text_encoders, device: torch.device, cache: bool):
        self.family = family
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.device = device
        self.cache = cache
        self._token_ids: dict[str, list[torch.Tensor]] = {}
        self._embedded: dict[str, PromptEmbeddings] = {}

    def _tokens(self, prompt: str) -> list[torch.Tensor]:
        """Token ids (77,) per tokenizer; tokenising is host work, so it is done once per prompt."""
        if prompt not in self._token_ids:
            self._token_ids[prompt] = [
                tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids[0].to(self.device)
                for tok in self.tokenizers]
        return self._token_ids[prompt]

    def _run_encoders(self, prompts: list[str]) -> PromptEmbeddings:
        ids = [torch.stack([self._tokens(p)[i] for p in prompts]) for i in range(len(self.tokenizers))]
        if self.family is not SDXL:
            return PromptEmbeddings(self.text_encoders[0](ids[0])[0], None)
        hidden, pooled = [], None
        for encoder, encoder_ids in zip(self.text_encoders, ids, strict=True):
            out = encoder(encoder_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # the last encoder's pooled, projected embedding (B, D2)
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    @torch.no_grad()
    def precompute(self, prompts) -> None:
        """Encodes every distinct prompt once (frozen encoders); the encoders are not needed afterwards."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._embedded:
                out = self._run_encoders([prompt])
                self._embedded[prompt] = PromptEmbeddings(out.hidden[0], None if out.pooled is None else out.pooled[0])

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        if not self.cache:
            return self._run_encoders(prompts)
        missing = [p for p in prompts if p not in self._embedded]
        if missing:
            self.precompute(missing)
        rows = [self._embedded[p] for p in prompts]
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEmbeddings(torch.stack([r.hidden for r in rows]), pooled)

    def unet_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        """encoder_hidden_states (and SDXL's added_cond_kwargs) for the rows of `batch`."""
        embeds = self.encode(batch["prompts"])
        kwargs = {"encoder_hidden_states": embeds.hidden.to(dtype)}
        if self.family is SDXL:
            # (B, 6): original (h, w), crop (top, left), target (h, w), as the SDXL paper orders them.
            time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"]], dim=1)
            kwargs["added_cond_kwargs"] = {"text_embeds": embeds.pooled.to(dtype),
                                           "time_ids": time_ids.to(self.device, dtype)}
        return kwargs
