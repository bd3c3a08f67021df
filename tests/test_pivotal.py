"""Pivotal tuning (--train_text_encoder_ti): the trigger word's vectors train with the adapters, are saved,
resumed, loaded, detached, exported as A1111 / ComfyUI / diffusers embeddings and baked into merged models."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from training_helpers import PROMPT, forbid_model_load, make_photos, run_training, tiny_config

from moslora_diffusion import AdapterConfig, attach_to_pipeline, detach_from_pipeline, load_adapter, save_adapter
from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.moslora.inject import AdapterError
from moslora_diffusion.moslora.token_vectors import (
    attach_token_vectors,
    pipeline_token_vectors,
    word_token_ids,
)
from moslora_diffusion.training.run_folder.checkpoints import CheckpointError
from moslora_diffusion.training.settings.config import ConfigError

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


def pivotal_adapter(model_dir, path, text_targets=None, seed: int = 0):
    """A saved adapter with non-zero B and trained-looking (perturbed) vectors for WORD."""
    pipe = load_pipe(model_dir)
    torch.manual_seed(seed)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8), text_targets=text_targets)
    randomize_adapters(pipe, seed)
    attach_token_vectors(pipe, WORD)
    perturb_vectors(pipe, seed)
    return save_adapter(pipe, path, {"instance_prompt": PROMPT})


@torch.no_grad()
def prompt_embeds(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """What the pipeline conditions the UNet on (diffusers' encode_prompt: textual-inversion tokens expanded)."""
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_sd1_embedding_file_has_the_a1111_key_and_loads_in_diffusers(tiny_sd15_dir, tmp_path):
    """The lora-kohya export writes sks.safetensors beside the LoRA: emb_params (one vector per token of the word),
    and diffusers' load_textual_inversion on the base model gives our row replacement's prompt embedding."""
    from moslora_diffusion.formats.export_targets import export_pipeline

    adapter = pivotal_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors")  # UNet-only LoRA
    export_pipeline(load_pipe(tiny_sd15_dir), [(adapter, 1.0)], "lora-kohya", tmp_path / "out" / "subject.safetensors")
    tensors, metadata = load_tensors(tmp_path / "out" / f"{WORD}.safetensors")
    ours = load_pipe(tiny_sd15_dir)
    load_adapter(ours, adapter)
    assert set(tensors) == {"emb_params"} and metadata["token_abstraction"] == WORD
    assert tensors["emb_params"].shape == (len(word_token_ids(ours.tokenizer, WORD)), 32)

    theirs = load_pipe(tiny_sd15_dir)
    theirs.load_textual_inversion(str(tmp_path / "out" / f"{WORD}.safetensors"), token=WORD)
    base = prompt_embeds(load_pipe(tiny_sd15_dir))
    expected = prompt_embeds(ours)
    assert (expected - base).abs().max() > 1e-2  # the vectors change the prompt: the comparison is not trivial
    torch.testing.assert_close(prompt_embeds(theirs), expected, atol=1e-5, rtol=0)


def test_sdxl_embedding_file_has_clip_l_and_clip_g(tiny_sdxl_dir, tmp_path):
    """lora-diffusers export of an SDXL adapter: sks.safetensors with clip_l / clip_g, each loaded into its
    encoder with diffusers' load_textual_inversion, gives our prompt embeddings and pooled embedding (<= 1e-5)."""
    from moslora_diffusion.formats.export_targets import export_pipeline

    adapter = pivotal_adapter(tiny_sdxl_dir, tmp_path / "run" / "moslora.safetensors")
    export_pipeline(load_pipe(tiny_sdxl_dir), [(adapter, 1.0)], "lora-diffusers", tmp_path / "out")
    tensors, _ = load_tensors(tmp_path / "out" / f"{WORD}.safetensors")
    ours = load_pipe(tiny_sdxl_dir)
    load_adapter(ours, adapter)
    assert set(tensors) == {"clip_l", "clip_g"}
    n = len(word_token_ids(ours.tokenizer, WORD))
    assert tensors["clip_l"].shape == (n, ours.text_encoder.config.hidden_size)
    assert tensors["clip_g"].shape == (n, ours.text_encoder_2.config.hidden_size)

    theirs = load_pipe(tiny_sdxl_dir)
    theirs.load_textual_inversion(tensors["clip_l"], token=WORD, text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(tensors["clip_g"], token=WORD, text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    with torch.no_grad():
        expected = ours.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        got = theirs.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)  # (1, 77, 768+1280 scaled down)
    torch.testing.assert_close(got[2], expected[2], atol=1e-5, rtol=0)  # pooled


def test_merged_single_file_bakes_the_vectors_into_the_token_rows(tiny_sd15_dir, tmp_path):
    """merged-single-file (fp32): the token-embedding rows of the word equal the vectors, and the baked pipeline
    encodes like the loaded adapter + vectors (text-encoder LoRA too, <= 1e-5)."""
    from moslora_diffusion.formats.export_targets import export_pipeline

    adapter = pivotal_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors", text_targets="attn")
    merged = load_pipe(tiny_sd15_dir)
    export_pipeline(merged, [(adapter, 1.0)], "merged-single-file", tmp_path / "merged.safetensors", dtype="fp32")
    assert not pipeline_token_vectors(merged)  # baked, not attached
    ours = load_pipe(tiny_sd15_dir)
    load_adapter(ours, adapter)
    torch.testing.assert_close(encoder_outputs(merged)["text_encoder"], encoder_outputs(ours)["text_encoder"],
                               atol=1e-5, rtol=0)
    rows = load_tensors(tmp_path / "merged.safetensors")[0][
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    module = pipeline_token_vectors(ours)["text_encoder"]
    assert torch.equal(rows[module.token_ids], module.vectors.detach())


def test_sdxl_training_learns_both_encoders_vectors_and_writes_clip_l_clip_g(tiny_sdxl_dir, tmp_path):
    """2 SDXL steps: both encoders' vectors moved from the base rows (the first encoder is read at its
    penultimate layer, still downstream of the embedding), and sks.safetensors holds them per token."""
    photos = make_photos(tmp_path / "photos", count=1)
    run_training(tiny_config(tiny_sdxl_dir, photos, tmp_path / "run", max_train_steps=2, train_text_encoder_ti=True,
                             token_abstraction=WORD, embedding_lr=5e-2))
    native = load_tensors(tmp_path / "run" / "moslora.safetensors")[0]
    embedding = load_tensors(tmp_path / "run" / f"{WORD}.safetensors")[0]
    base = load_pipe(tiny_sdxl_dir)
    for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        tok = getattr(base, name.replace("text_encoder", "tokenizer"))
        ids = list(dict.fromkeys(word_token_ids(tok, WORD)))
        vectors = native[f"embeddings.{name}.{WORD}"]
        rows = getattr(base, name).get_input_embeddings().weight[ids]
        assert ((vectors - rows).abs().amax(dim=1) > 1e-3).all(), name
        assert torch.equal(embedding[key], vectors[[ids.index(i) for i in word_token_ids(tok, WORD)]])


def test_mole_refuses_a_pivotal_tuned_expert(tiny_sd15_dir, tmp_path):
    from moslora_diffusion.mole.experts import MoLEError, read_expert

    adapter = pivotal_adapter(tiny_sd15_dir, tmp_path / "moslora.safetensors")
    with pytest.raises(MoLEError, match="pivotal tuning"):
        read_expert(adapter, load_pipe(tiny_sd15_dir), "dog")



def test_mole_refuses_the_folded_lora_exports_of_a_pivotal_run(tiny_sd15_dir, tmp_path):
    """The kohya / diffusers LoRA of a pivotal-tuned adapter lacks the word's vectors: MoLE took it as a plain expert
    (a subject without its trigger word). The training run's exports and the export command's record the word."""
    from moslora_diffusion.formats.export_targets import export_pipeline
    from moslora_diffusion.mole.experts import MoLEError, read_expert

    photos = make_photos(tmp_path / "photos", count=2)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "run", train_text_encoder_ti=True,
                             token_abstraction=WORD))
    adapter = tmp_path / "run" / "moslora.safetensors"
    export_pipeline(load_pipe(tiny_sd15_dir), [(adapter, 1.0)], "lora-kohya", tmp_path / "out" / "k.safetensors")
    export_pipeline(load_pipe(tiny_sd15_dir), [(adapter, 1.0)], "lora-diffusers", tmp_path / "out" / "d")
    files = [tmp_path / "run" / "lora_kohya.safetensors", tmp_path / "run" / "pytorch_lora_weights.safetensors",
             tmp_path / "out" / "k.safetensors", tmp_path / "out" / "d" / "pytorch_lora_weights.safetensors"]
    for file in files:
        with pytest.raises(MoLEError, match=rf"^{file} was trained with pivotal tuning \(learned vectors for '{WORD}'"):
            read_expert(file, load_pipe(tiny_sd15_dir), "dog")
    plain = tmp_path / "plain"  # the same run without pivotal tuning stays a valid expert
    run_training(tiny_config(tiny_sd15_dir, photos, plain))
    assert read_expert(plain / "lora_kohya.safetensors", load_pipe(tiny_sd15_dir), "dog").trigger_prompt == PROMPT


def test_app_and_generate_fusion_apply_and_remove_the_vectors(tiny_sd15_dir, tmp_path):
    """FusedAdapters (what the app and the generate command load through): the word's vectors apply with the
    adapter (same text-encoder output as load_adapter, <= 1e-6), unloading restores the base bit for bit, and a
    second pivotal-tuned adapter is refused in one line while the first is loaded."""
    from moslora_diffusion.generation.fusion import FusedAdapters

    first = pivotal_adapter(tiny_sd15_dir, tmp_path / "a" / "moslora.safetensors", text_targets="attn")
    second = pivotal_adapter(tiny_sd15_dir, tmp_path / "b" / "moslora.safetensors", seed=1)
    base = encoder_outputs(load_pipe(tiny_sd15_dir))["text_encoder"]
    ours = load_pipe(tiny_sd15_dir)
    load_adapter(ours, first)
    pipe = load_pipe(tiny_sd15_dir)
    fusion = FusedAdapters(pipe)
    fusion.add("a", first, 1.0)
    torch.testing.assert_close(encoder_outputs(pipe)["text_encoder"], encoder_outputs(ours)["text_encoder"],
                               atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="already brings its trigger word's vectors") as err:
        fusion.add("b", second, 1.0)
    assert "\n" not in str(err.value) and fusion.names() == ["a"]
    fusion.remove("a")
    assert torch.equal(encoder_outputs(pipe)["text_encoder"], base)
    fusion.add("b", second, 0.5)  # the slot is free again
    assert pipeline_token_vectors(pipe)


@pytest.mark.parametrize("change", ["width", "tokens", "nan"])
def test_vectors_that_do_not_fit_the_base_or_are_not_finite_are_refused_before_touching_it(
        tiny_sd15_dir, tmp_path, change):
    """An embedding of another width, token count or a diverged run (NaN: black images) is one line naming the file;
    the pipeline keeps no adapter and no vectors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moslora_diffusion import pipeline_adapters

    path = pivotal_adapter(tiny_sd15_dir, tmp_path / "good.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = f"embeddings.text_encoder.{WORD}"
    n, width = tensors[key].shape
    tensors[key], message = {
        "width": (torch.randn(n, width + 3), rf"are \({n}, {width + 3}\), but this model's tokenizer and encoder "
                                             rf"need \({n}, {width}\): made for another base model"),
        "tokens": (torch.randn(n + 2, width), rf"are \({n + 2}, {width}\), but .* need \({n}, {width}\)"),
        "nan": (torch.full((n, width), float("nan")), "hold NaN or inf"),
    }[change]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    pipe = load_pipe(tiny_sd15_dir)
    with pytest.raises(AdapterError, match=rf"^{bad}: the vectors of '{WORD}' for text_encoder {message}"):
        load_adapter(pipe, bad)
    assert not pipeline_adapters(pipe) and not pipeline_token_vectors(pipe)


def test_captions_without_the_word_stop_the_run_before_the_model_loads(tiny_sd15_dir, tmp_path, monkeypatch):
    """Sidecar captions take precedence over --instance_prompt: with the word in none of them the vectors got no
    gradient and the run silently saved the base rows as the learned embedding."""
    photos = make_photos(tmp_path / "photos", count=2)
    for i in range(2):
        (photos / f"photo_{i}.txt").write_text("a photo of a dog\n", encoding="utf-8")
    forbid_model_load(monkeypatch)
    config = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", train_text_encoder_ti=True, token_abstraction=WORD)
    with pytest.raises(ConfigError, match=rf"^--token_abstraction '{WORD}' is in none of the photos' captions \(e\.g\. "
                                          r"'a photo of a dog'\), so its vectors would not train"):
        run_training(config)
    assert not (tmp_path / "out").exists()  # nothing written
    (photos / "photo_1.txt").write_text(f"a photo of {WORD} dog, on grass\n", encoding="utf-8")  # one is enough
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):  # past the check: the model loads next
        run_training(config)
