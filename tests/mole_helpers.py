"""Shared by the MoLE tests: three native experts per tiny family and one conditioned UNet forward."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_adapter

# Three experts adapting different sets of layers, all with non-zero B (make_adapter randomises it):
# dog: UNet attention + text attention; cat: UNet attention + proj_in/out, no text encoder;
# style: UNet attention + feed-forward + the resnets' time_emb_proj (outside every transformer block: ungated),
# text attention + MLP.
EXPERT_SPECS = {
    "dog": dict(seed=1, rank=4, alpha=8, unet_targets="attn", text_targets="attn"),
    "cat": dict(seed=2, rank=2, alpha=4, unet_targets="attn+proj", text_targets=None),
    "style": dict(seed=3, rank=3, alpha=3, unet_targets="to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,time_emb_proj",
                  text_targets="attn+mlp"),
}
TIME_IDS = [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # SDXL micro-conditioning: original size, crop, target size


def make_experts(model_dir: Path, root: Path, names=("dog", "cat", "style")) -> dict[str, Path]:
    """Training-output-like folders <root>/<name>/moslora.safetensors, each recording its trigger prompt."""
    out = {}
    for name in names:
        path = make_adapter(model_dir, root / name / "moslora.safetensors", std=0.3, **EXPERT_SPECS[name])
        out[name] = path.parent
    return out


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def encode(pipe, prompts: list[str], length: int = 77) -> dict:
    """The UNet's conditioning for `prompts` with the text encoder(s) of `pipe` (hooks included)."""
    def ids(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    if not is_sdxl(pipe):
        return {"encoder_hidden_states": pipe.text_encoder(ids(pipe.tokenizer))[0]}
    first = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
    second = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([TIME_IDS] * len(prompts))
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": second[0], "time_ids": time_ids}}


def latents(batch: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def forward(pipe, prompts: list[str], size: int = 16, length: int = 77, timestep: int = 500):
    """(prompt conditioning, UNet output) for one denoising forward on seeded latents."""
    cond = encode(pipe, prompts, length)
    out = pipe.unet(latents(len(prompts), size), timestep, **cond).sample
    return cond["encoder_hidden_states"], out


def state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of the UNet and text encoder(s), cloned."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            out.update({f"{name}.{k}": v.clone() for k, v in model.state_dict().items()})
    return out


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
