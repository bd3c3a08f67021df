"""Textual-inversion embedding files of the trigger word's learned vectors (pivotal tuning).

The folded LoRA exports cannot carry the word's vectors, so they go beside them as the embedding file the
ecosystem loads, named after the word (A1111 and ComfyUI trigger an embedding by its file name):
- SD 1.x / 2.x: `<word>.safetensors` with `emb_params` (n, D), A1111's layout, which diffusers'
  `pipe.load_textual_inversion(path, token=word)` also reads;
- SDXL: `<word>.safetensors` with `clip_l` (n, 768) and `clip_g` (n, 1280), the A1111 / ComfyUI SDXL layout.
n is the number of tokens the word is written with (one vector per token, in order), D the encoder's width.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..files.safetensors_io import save_tensors
from ..moslora.token_vectors import pipeline_token_vectors, position_vectors, tokenizer_for

# A1111 / ComfyUI SDXL embedding keys, per text encoder attribute.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SD_KEY = "emb_params"


def embedding_file_tensors(pipe) -> dict[str, torch.Tensor]:
    """{emb_params} or {clip_l, clip_g}: (n, D) fp32 vectors of the attached trigger word; {} when none."""
    found = pipeline_token_vectors(pipe)
    if not found:
        return {}
    vectors = {name: position_vectors(tokenizer_for(pipe, name), module) for name, module in found.items()}
    if len(vectors) == 1:
        return {SD_KEY: next(iter(vectors.values()))}
    return {SDXL_KEYS[name]: tensor for name, tensor in vectors.items()}


def embedding_file_for(word: str) -> str:
    """`<word>.safetensors`: A1111 and ComfyUI name an embedding by its file name."""
    return f"{word}.safetensors"


def embedding_file_name(pipe) -> str | None:
    """`<word>.safetensors` of the attached trigger word, None without one."""
    words = {module.word for module in pipeline_token_vectors(pipe).values()}
    return embedding_file_for(next(iter(words))) if words else None


def write_embedding(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], overwrite: bool = True) -> Path:
    """Writes `<folder>/<name>` (`<word>.safetensors`, embedding_file_tensors' layout) atomically."""
    return save_tensors(tensors, Path(folder) / name, {"token_abstraction": name.removesuffix(".safetensors"),
                                                       "format": "pt"}, overwrite=overwrite)


def save_embedding_file(pipe, folder: str | Path, overwrite: bool = True) -> Path | None:
    """Writes `<folder>/<word>.safetensors` for the attached trigger word; None when there is none."""
    name = embedding_file_name(pipe)
    return write_embedding(folder, name, embedding_file_tensors(pipe), overwrite) if name else None
