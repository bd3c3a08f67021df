"""Pivotal tuning in the DreamBooth trainer (--train_text_encoder_ti --token_abstraction sks [--embedding_lr]).

The trigger word's token vectors (moslora/token_vectors.py) train with the adapters, as in diffusers'
advanced SDXL DreamBooth script and OneTrainer: their own optimizer group (--embedding_lr, no weight decay:
decay would pull the word towards the zero vector, not towards its start), their own checkpoint file
(`embeddings.safetensors`), and the word in the checkpoint identity so a resume with another word is refused.
The word's checks before anything loads are in settings/trigger_word.py.
"""

from __future__ import annotations

import torch

from ...moslora.token_vectors import attach_token_vectors, pipeline_token_vectors, token_vector_tensors
from ..run_folder.checkpoints import CheckpointError, CheckpointInfo

CHECKPOINT_STEM = "embeddings"  # checkpoint-N/embeddings.safetensors: {text encoder: (n, D)}


def attach_trigger_vectors(pipe, config) -> list[torch.nn.Parameter]:
    """The word's vectors in every text encoder (trainable, fp32, equal to its current rows); their parameters."""
    return [module.vectors for module in attach_token_vectors(pipe, config.token_abstraction).values()]


def embedding_group(config, params: list[torch.nn.Parameter]) -> list[dict]:
    """The vectors' optimizer group (empty list without pivotal tuning)."""
    if not params:
        return []
    return [{"params": params, "lr": config.embedding_lr or config.learning_rate, "weight_decay": 0.0}]


def identity(config) -> dict:
    """What a checkpoint records of pivotal tuning (nothing without it: older checkpoints stay compatible)."""
    return {"token_abstraction": config.token_abstraction} if config.train_text_encoder_ti else {}


def check_same_word(info: CheckpointInfo, config) -> None:
    stored, ours = info.state.get("token_abstraction"), identity(config).get("token_abstraction")
    if stored != ours:
        def describe(word):
            return f"--token_abstraction {word}" if word else "no pivotal tuning"
        raise CheckpointError(f"checkpoint {info.path} was trained with {describe(stored)}, but this run has "
                              f"{describe(ours)}; resume with the same --train_text_encoder_ti/--token_abstraction")


def tensors(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """{CHECKPOINT_STEM: {text encoder: vectors}}, or {} without pivotal tuning."""
    found = token_vector_tensors(pipe)
    return {CHECKPOINT_STEM: found} if found else {}


def load(pipe, stored: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copies a checkpoint's vectors back, bit for bit."""
    modules = pipeline_token_vectors(pipe)
    if not modules:
        return
    with torch.no_grad():
        for name, module in modules.items():
            module.vectors.copy_(stored[CHECKPOINT_STEM][name])
