"""Pivotal tuning (textual inversion + LoRA): learned vectors for the trigger word's token(s).

The user's prompts stay as they are ("a photo of sks dog"): every token the trigger word tokenizes to
(alone, without BOS/EOS; usually one, a rare word may give several) gets a trainable replacement of its
row in each text encoder's token embedding (SDXL: both encoders, 768 and 1280 wide). The vectors start
as copies of those rows, so before training the model is the base model exactly. Every other row stays
frozen. This is what A1111 / ComfyUI embeddings do at inference: the word's tokens become the vectors.

A TokenVectors module replaces the encoder's input embedding (`get_input_embeddings()`), holds the
(n_tokens, D) fp32 vectors as its parameter (so DDP, EMA and checkpoints treat it like any other) and
substitutes them for the word's token ids. Taking it off puts the untouched original embedding back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.families import detect_family
from .inject import AdapterError


class TokenVectors(nn.Module):
    """nn.Embedding whose rows `token_ids` are replaced by the trainable `vectors` (n, D), fp32."""

    def __init__(self, base: nn.Embedding, token_ids: list[int], word: str):
        super().__init__()
        self.base, self.word = base, word
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.vectors = nn.Parameter(base.weight.detach()[self.token_ids].float().clone())

    @property
    def weight(self) -> torch.Tensor:  # readers of get_input_embeddings().weight (dtype, device, size)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D) in the base embedding's dtype, the word's tokens replaced."""
        out = self.base(input_ids)
        hit = input_ids.unsqueeze(-1) == self.token_ids  # (B, T, n)
        # (B, T, n) one-hot @ (n, D): the vector of the token at each hit, zero elsewhere; differentiable.
        replaced = hit.to(self.vectors.dtype) @ self.vectors
        return torch.where(hit.any(-1, keepdim=True), replaced.to(out.dtype), out)


def tokenizer_for(pipe, component: str):
    """The tokenizer paired with a text encoder attribute (text_encoder_2 -> tokenizer_2)."""
    return getattr(pipe, component.replace("text_encoder", "tokenizer"))


def word_token_ids(tokenizer, word: str) -> list[int]:
    """The ids `word` tokenizes to alone (no BOS/EOS), in order; AdapterError when it gives none."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise AdapterError(f"--token_abstraction {word!r} tokenizes to no token: give a word, e.g. sks")
    return list(ids)


def distinct_token_ids(tokenizer, word: str) -> list[int]:
    """The word's token ids, each once (one vector per distinct token, e.g. 'sas' -> s, a, s</w>: 3)."""
    return list(dict.fromkeys(word_token_ids(tokenizer, word)))


def position_vectors(tokenizer, module: TokenVectors) -> torch.Tensor:
    """(n_positions, D): one vector per token of the word as it is written, which is what an A1111 / ComfyUI /
    diffusers embedding inserts in place of the word."""
    ids = module.token_ids.tolist()
    return module.vectors.detach().float()[[ids.index(i) for i in word_token_ids(tokenizer, module.word)]]


def pipeline_token_vectors(pipe) -> dict[str, TokenVectors]:
    """{text encoder attribute: its TokenVectors} of the encoders that have them."""
    found = {}
    for name in detect_family(pipe).text_encoders:
        encoder = getattr(pipe, name, None)
        if encoder is not None and isinstance(encoder.get_input_embeddings(), TokenVectors):
            found[name] = encoder.get_input_embeddings()
    return found


def attach_token_vectors(pipe, word: str) -> dict[str, TokenVectors]:
    """Gives `word` trainable vectors in every text encoder of `pipe`, initialised from its current rows.

    Returns {text encoder attribute: TokenVectors}. AdapterError, changing nothing, when vectors are
    attached already or the word tokenizes to nothing.
    """
    if pipeline_token_vectors(pipe):
        raise AdapterError("this pipeline already has trigger-word vectors attached; detach them first")
    names = detect_family(pipe).text_encoders
    ids = {name: distinct_token_ids(tokenizer_for(pipe, name), word) for name in names}  # all checked first
    attached = {}
    for name in names:
        encoder = getattr(pipe, name)
        attached[name] = TokenVectors(encoder.get_input_embeddings(), ids[name], word)
        encoder.set_input_embeddings(attached[name])
    return attached


def check_token_vectors(pipe, word: str, vectors: dict[str, torch.Tensor], label: str) -> None:
    """AdapterError naming `label` unless `vectors` ({encoder: (n, D)}) fit this pipeline's encoders and are finite."""
    if pipeline_token_vectors(pipe):
        raise AdapterError(f"{label}: this pipeline already has trigger-word vectors attached; detach them first")
    for name, tensor in vectors.items():
        encoder = getattr(pipe, name, None)
        if encoder is None:
            raise AdapterError(f"{label}: has vectors of {word!r} for {name}, which this model does not have")
        n = len(distinct_token_ids(tokenizer_for(pipe, name), word))
        width = encoder.get_input_embeddings().weight.shape[1]
        if tuple(tensor.shape) != (n, width):
            raise AdapterError(f"{label}: the vectors of {word!r} for {name} are {tuple(tensor.shape)}, but this "
                               f"model's tokenizer and encoder need ({n}, {width}): made for another base model")
        if not torch.isfinite(tensor).all():  # as check_finite for the LoRA weights: NaN rows give black images
            raise AdapterError(f"{label}: the vectors of {word!r} for {name} hold NaN or inf (a diverged training "
                               "run?)")


def load_token_vectors(pipe, word: str, vectors: dict[str, torch.Tensor]) -> dict[str, TokenVectors]:
    """Attaches vectors for `word` and copies the stored ones ({encoder: (n, D)}) in."""
    check_token_vectors(pipe, word, vectors, "token vectors")
    attached = attach_token_vectors(pipe, word)
    with torch.no_grad():
        for name, tensor in vectors.items():
            attached[name].vectors.copy_(tensor)
    return attached


def token_vector_tensors(pipe) -> dict[str, torch.Tensor]:
    """{encoder: (n, D) fp32 vectors, detached} of the attached TokenVectors."""
    return {name: module.vectors.detach().float() for name, module in pipeline_token_vectors(pipe).items()}


def detach_token_vectors(pipe) -> None:
    """Puts each encoder's original embedding back (its weights were never changed: exact)."""
    for name, module in pipeline_token_vectors(pipe).items():
        getattr(pipe, name).set_input_embeddings(module.base)


@contextmanager
def token_vectors_off(pipe) -> Iterator[None]:
    """The original embeddings in place for the with block (the base model's text encoders exactly), the
    TokenVectors back afterwards, also when the block raises."""
    attached = pipeline_token_vectors(pipe)
    try:
        detach_token_vectors(pipe)
        yield
    finally:
        for name, module in attached.items():
            getattr(pipe, name).set_input_embeddings(module)


def bake_token_vectors(pipe) -> None:
    """Writes the vectors into the embedding rows for good (rounded to the embedding's dtype), then detaches."""
    with torch.no_grad():
        for module in pipeline_token_vectors(pipe).values():
            module.base.weight[module.token_ids] = module.vectors.to(module.base.weight.dtype)
    detach_token_vectors(pipe)
