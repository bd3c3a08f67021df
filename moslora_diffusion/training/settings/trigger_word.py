"""The trigger word of pivotal tuning (--train_text_encoder_ti --token_abstraction sks): the checks made before
anything loads (the flags, and that the word is in the captions). The word's vectors train in model/pivotal.py.
"""

from __future__ import annotations

import re

from .flags import ConfigError

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
