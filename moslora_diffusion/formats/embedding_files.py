"""Textual-inversion embedding files of the trigger word's learned vectors (pivotal tuning).

The folded LoRA exports cannot carry the word's vectors, so they go beside them as the embedding file the
ecosystem loads, named after the word (A1111 and ComfyUI trigger an embedding by its file name):
- SD 1.x / 2.x: `<word>.safetensors` with `emb_params` (n, D), A1111's layout, which diffusers'
  `pipe.load_textual_inversion(path, token=word)` also reads;
- SDXL: `<word>.safetensors` with `clip_l` (n, 768) and `clip_g` (n, 1280), the A1111 / ComfyUI SDXL layout.
n is the number of tokens the word is written with (one vector per token, in order), D the encoder's width.
Each file's metadata records who wrote it (EMBEDDING_RECORD): an export replaces only an export's embedding, never a
user's own `<word>.safetensors` nor a training run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._version import __version__
from ..files.safetensors_io import WeightFileError, read_metadata, save_tensors
from ..moslora.token_vectors import pipeline_token_vectors, position_vectors, tokenizer_for
from .merge import ADAPTER_FILE_NAME

# A1111 / ComfyUI SDXL embedding keys, per text encoder attribute.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SD_KEY = "emb_params"
EMBEDDING_RECORD = "moslora_embedding"  # metadata key: {"written_by": "export" | "training run", "moslora_diffusion"}
LEGACY_METADATA_KEYS = {"token_abstraction", "format"}  # all that an embedding of ours held before EMBEDDING_RECORD


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


def write_embedding(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], overwrite: bool = True,
                    written_by: str = "export") -> Path:
    """Writes `<folder>/<name>` (`<word>.safetensors`, embedding_file_tensors' layout) atomically."""
    metadata = {"token_abstraction": name.removesuffix(".safetensors"), "format": "pt",
                EMBEDDING_RECORD: {"written_by": written_by, "moslora_diffusion": __version__}}
    return save_tensors(tensors, Path(folder) / name, metadata, overwrite=overwrite)


def save_embedding_file(pipe, folder: str | Path, overwrite: bool = True) -> Path | None:
    """Writes `<folder>/<word>.safetensors` for the attached trigger word (a training run's); None without one."""
    name = embedding_file_name(pipe)
    return write_embedding(folder, name, embedding_file_tensors(pipe), overwrite, "training run") if name else None


def is_export_embedding(path: str | Path) -> bool:
    """Whether `path` is an embedding file an export wrote, the only kind an export may replace. One written before
    EMBEDDING_RECORD is known by its exact metadata, outside a training run's folder (a run's own pairs with its
    adapter). Anything else (another tool's embedding, a renamed file, a damaged one) is not."""
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except WeightFileError:
        return False
    if EMBEDDING_RECORD not in metadata:
        return (set(metadata) == LEGACY_METADATA_KEYS and metadata["token_abstraction"] == path.stem
                and not (path.parent / ADAPTER_FILE_NAME).exists())
    try:
        return json.loads(metadata[EMBEDDING_RECORD]).get("written_by") == "export"
    except (ValueError, AttributeError):
        return False
