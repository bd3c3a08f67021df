"""Pivotal tuning (--train_text_encoder_ti): the trigger word's vectors train with the adapters, are saved,
resumed, loaded, detached, exported as A1111 / ComfyUI / diffusers embeddings and baked into merged models."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from training_helpers import PROMPT, make_photos, run_training, tiny_config

from moslora_diffusion import AdapterConfig, attach_to_pipeline, detach_from_pipeline, load_adapter, save_adapter
from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.moslora.inject import AdapterError
from moslora_diffusion.moslora.token_vectors import (
    attach_token_vectors,
    pipeline_token_vectors,
    word_token_ids,
)
from moslora_diffusion.training.checkpoints import CheckpointError
from moslora_diffusion.training.config import ConfigError

WORD = "sks"


def load_pipe(model_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir)


@torch.no_grad()
def encoder_outputs(pipe, prompt: str = PROMPT) -> dict[str, torch.Tensor]:
    """Last hidden state (1, 77, D) of every text encoder for `prompt`."""
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            tok = getattr(pipe, name.replace("text_encoder", "tokenizer"))
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out[name] = encoder(ids)[0]
    return out


@torch.no_grad()
def perturb_vectors(pipe, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in pipeline_token_vectors(pipe).values():
        module.vectors.add_(torch.randn(module.vectors.shape, generator=g) * std)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_vectors_start_at_the_base_model_exactly(tiny_dirs, family):
    pipe = load_pipe(tiny_dirs[family])
    before = encoder_outputs(pipe)
    attached = attach_token_vectors(pipe, WORD)
    assert set(attached) == set(before)  # SDXL: both encoders (768-wide and 1280-wide in the real model)
    for module in attached.values():
        assert module.vectors.dtype == torch.float32 and module.vectors.requires_grad
        assert module.vectors.shape == (len(set(word_token_ids(pipe.tokenizer, WORD))), module.weight.shape[1])
    after = encoder_outputs(pipe)
    for name in before:
        assert torch.equal(before[name], after[name])


def test_only_the_word_vectors_get_gradient_and_change(tiny_sd15_dir):
    pipe = load_pipe(tiny_sd15_dir)
    pipe.text_encoder.requires_grad_(False)
    module = attach_token_vectors(pipe, WORD)["text_encoder"]
    rows_before, vectors_before = module.base.weight.clone(), module.vectors.detach().clone()
    optimizer = torch.optim.AdamW([module.vectors], lr=1e-2, weight_decay=0.0)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    for _ in range(3):
        loss = pipe.text_encoder(ids)[0].square().mean()
        loss.backward()
        assert module.vectors.grad is not None and module.vectors.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert not module.base.weight.requires_grad
    assert torch.equal(module.base.weight, rows_before)  # every row of the embedding as it was
    assert (module.vectors.detach() - vectors_before).abs().min() > 0  # every vector moved
    # a prompt without the word is untouched by the vectors
    other = pipe.tokenizer("a photo of a dog", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    assert not torch.isin(other, module.token_ids).any()
    with torch.no_grad():
        assert torch.equal(module(other), module.base(other))


def test_save_load_round_trip_and_detach_restores_the_base(tiny_sdxl_dir, tmp_path):
    """Non-zero B on UNet and both text encoders, perturbed vectors: load_adapter reproduces the text-encoder
    outputs of the pipeline that saved (<= 1e-6), detach gives the base outputs bit for bit."""
    base_outputs = encoder_outputs(load_pipe(tiny_sdxl_dir))
    pipe = load_pipe(tiny_sdxl_dir)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8), text_targets="attn")
    randomize_adapters(pipe)
    attach_token_vectors(pipe, WORD)
    perturb_vectors(pipe)
    trained = encoder_outputs(pipe)
    path = save_adapter(pipe, tmp_path / "moslora.safetensors")
    tensors, _ = load_tensors(path)
    assert {f"embeddings.text_encoder.{WORD}", f"embeddings.text_encoder_2.{WORD}"} <= set(tensors)

    fresh = load_pipe(tiny_sdxl_dir)
    adapter = load_adapter(fresh, path)
    assert adapter.token_abstraction == WORD
    loaded = encoder_outputs(fresh)
    for name in trained:
        assert not torch.allclose(trained[name], base_outputs[name], atol=1e-3)  # the word really changed
        torch.testing.assert_close(loaded[name], trained[name], atol=1e-6, rtol=0)
    detach_from_pipeline(fresh)
    assert not pipeline_token_vectors(fresh)
    for name, value in encoder_outputs(fresh).items():
        assert torch.equal(value, base_outputs[name])


def test_loading_vectors_twice_is_refused_before_touching_the_pipeline(tiny_sd15_dir, tmp_path):
    pipe = load_pipe(tiny_sd15_dir)
    attach_to_pipeline(pipe, AdapterConfig(rank=4))
    attach_token_vectors(pipe, WORD)
    path = save_adapter(pipe, tmp_path / "a.safetensors")
    other = load_pipe(tiny_sd15_dir)
    attach_token_vectors(other, WORD)
    with pytest.raises(AdapterError, match="already has trigger-word vectors"):
        load_adapter(other, path)
    from moslora_diffusion import pipeline_adapters

    assert not pipeline_adapters(other)  # refused before any adapter was attached


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(train_text_encoder_ti=True), "needs --token_abstraction"),
    (dict(train_text_encoder_ti=True, token_abstraction="zwx"), "does not appear in --instance_prompt"),
    (dict(train_text_encoder_ti=True, token_abstraction="sk"), "does not appear in --instance_prompt"),
    (dict(train_text_encoder_ti=True, token_abstraction="sks dog"), "one word"),
    (dict(token_abstraction="sks"), "add --train_text_encoder_ti"),
    (dict(train_text_encoder_ti=True, token_abstraction="sks", embedding_lr=0.0), "--embedding_lr"),
])
def test_bad_pivotal_flags_fail_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(tmp_path / "m", tmp_path / "p", tmp_path / "o", **overrides)
    assert "\n" not in str(err.value)


def test_training_learns_the_vectors_and_resumes_bit_for_bit(tiny_sd15_dir, tmp_path):
    """4 steps straight vs 2 steps + resume to 4: the same adapter and vectors bit for bit; the vectors moved
    away from the base rows; a resume with another trigger word is refused in one line."""
    photos = make_photos(tmp_path / "photos", count=2)
    ti = dict(train_text_encoder_ti=True, token_abstraction=WORD, embedding_lr=5e-2, learning_rate=1e-3,
              checkpointing_steps=2)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "a", max_train_steps=4, **ti))
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", max_train_steps=2, **ti))
    checkpoint = load_tensors(tmp_path / "b" / "checkpoint-2" / "embeddings.safetensors")[0]
    assert set(checkpoint) == {"text_encoder"}
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", max_train_steps=4,
                                       resume_from_checkpoint="latest", **ti))
    assert resumed.resumed_from == 2
    a = load_tensors(tmp_path / "a" / "moslora.safetensors")[0]
    b = load_tensors(tmp_path / "b" / "moslora.safetensors")[0]
    assert a.keys() == b.keys() and f"embeddings.text_encoder.{WORD}" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key

    base = load_pipe(tiny_sd15_dir).text_encoder.get_input_embeddings().weight
    ids = list(dict.fromkeys(word_token_ids(load_pipe(tiny_sd15_dir).tokenizer, WORD)))
    moved = (a[f"embeddings.text_encoder.{WORD}"] - base[ids]).abs().amax(dim=1)
    assert (moved > 1e-3).all()  # each vector trained (lr 5e-2, 4 Adam steps: about 0.2 each)

    with pytest.raises(CheckpointError, match="--token_abstraction sks, but this run has --token_abstraction dog"):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "c", max_train_steps=4,
                                 resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"),
                                 **{**ti, "token_abstraction": "dog"}))
