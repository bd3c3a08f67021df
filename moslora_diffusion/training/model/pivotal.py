"""Pivotal tuning in the DreamBooth trainer (--train_text_encoder_ti --token_abstraction sks [--embedding_lr]).

The trigger word's token vectors (moslora/token_vectors.py) train with the adapters, as in diffusers'
advanced SDXL DreamBooth script and OneTrainer: their own optimizer group (--embedding_lr, no weight decay:
decay would pull the word towards the zero vector, not towards its start), their own checkpoint file
(`embeddings.safetensors`), and the word in the checkpoint identity so a resume with another word is refused.
"""

from __future__ import annotations

import re

import torch

from ...moslora.token_vectors import attach_token_vectors, pipeline_token_vectors, token_vector_tensors
from ..run_folder.checkpoints import CheckpointError, CheckpointInfo
from ..settings.flags import ConfigError

CHECKPOINT_STEM = "embeddings"  # checkpoint-N/embeddings.safetensors: {text encoder: (n, D)}
# The embedding file is <word>.safetensors beside the run's other files (formats/embedding_files.py): these words
# would name one of those.
RESERVED_WORDS = ("moslora", "moslora_best", "pytorch_lora_weights", "lora_kohya")


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word of a prompt ("sks" in "a photo of sks, dog", not in "sksx")."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def check_pivotal_flags(config) -> None:
    """ConfigError (one line, before anything loads) for pivotal-tuning flags that cannot work together."""
    word = config.token_abstraction
    if not config.train_text_encoder_ti:
        if word is not None or config.embedding_lr is not None:
            raise ConfigError("--token_abstraction and --embedding_lr apply to pivotal tuning only: add "
                              "--train_text_encoder_ti, or drop them")
        return
    if not (word or "").strip():
        raise ConfigError("--train_text_encoder_ti needs --token_abstraction, the trigger word of --instance_prompt "
                          "whose embedding is learned (e.g. --token_abstraction sks)")
    if word != word.strip() or len(word.split()) != 1:
        raise ConfigError(f"--token_abstraction {word!r} must be one word without spaces, e.g. sks")
    if word.lower() in RESERVED_WORDS or not re.fullmatch(r"[^/\\:*?\"<>|]+", word) or word.strip(".") == "":
        raise ConfigError(f"--token_abstraction {word!r} cannot name the embedding file <word>.safetensors written "
                          "beside the LoRAs: use another trigger word, e.g. sks")
    if not word_pattern(word).search(config.instance_prompt or ""):
        raise ConfigError(f"--token_abstraction {word!r} does not appear in --instance_prompt "
                          f"{config.instance_prompt!r}: use the trigger word of the prompt")


def check_word_in_captions(config, records) -> None:
    """ConfigError when pivotal tuning's word is in none of the training captions (sidecars and kohya folder names
    take precedence over --instance_prompt): its vectors would get no gradient and be saved as the base rows."""
    if not config.train_text_encoder_ti:
        return
    pattern = word_pattern(config.token_abstraction)
    if records and not any(pattern.search(record.caption) for record in records):
        raise ConfigError(f"--token_abstraction {config.token_abstraction!r} is in none of the photos' captions (e.g. "
                          f"{records[0].caption!r}), so its vectors would not train: add the word to the captions "
                          "(.txt / .caption files, folder names)")


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
