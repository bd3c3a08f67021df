"""Pretraining's code path end to end with a micro config (seconds; it learns nothing)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from moslora_diffusion.toy.pretrain import PRESETS, main


def test_micro_pretrain_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "toy"
    torch.set_num_threads(1)
    main(["--out", str(out), "--preset", "micro", "--seed", "0", "--device", "cpu"])
    record = json.loads((out / "toy_pretrain.json").read_text())
    assert record["config"]["unet_steps"] == PRESETS["micro"].unet_steps
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_rare_words_replace_the_article_with_unused_tokens():
    import numpy as np

    from moslora_diffusion.toy.models import build_tokenizer
    from moslora_diffusion.toy.pretrain import tokenize
    from moslora_diffusion.toy.rare_words import ARTICLE_POSITION, article_ids, rare_token_ids, with_rare_words
    from moslora_diffusion.toy.world import vocabulary

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()))
    pool = rare_token_ids(tokenizer, vocabulary())
    world_ids = {tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0] for w in vocabulary()}
    assert not world_ids & set(pool.tolist()) and not set(tokenizer.all_special_ids) & set(pool.tolist())
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize("sks"))[0] in pool.tolist()
    ids = tokenize(tokenizer, ["a photo of a red star", "", "a photo of an orange heart on the left"] * 20)
    out = with_rare_words(ids, pool, article_ids(tokenizer), 0.5, np.random.default_rng(0))
    changed = (out != ids).any(dim=1)
    assert torch.equal((out != ids).nonzero()[:, 1].unique(), torch.tensor([ARTICLE_POSITION]))
    assert not changed[1::3].any()  # empty captions have no article: untouched
    assert 10 <= int(changed.sum()) <= 30  # about half of the 40 captions with an article
    assert set(out[changed, ARTICLE_POSITION].tolist()) <= set(pool.tolist())


def test_continuing_a_saved_model_keeps_its_vae_and_records_where_it_came_from(tmp_path):
    import dataclasses

    from diffusers import StableDiffusionPipeline

    from moslora_diffusion.toy.pretrain import pretrain

    torch.set_num_threads(1)
    first = tmp_path / "first"
    main(["--out", str(first), "--preset", "micro", "--seed", "0", "--device", "cpu"])
    cfg = dataclasses.replace(PRESETS["micro"], rare_word_rate=1.0, unet_lr=1e-2)
    pretrain(tmp_path / "second", cfg, seed=1, device="cpu", log=lambda msg: None, init=first)
    a, b = (StableDiffusionPipeline.from_pretrained(p) for p in (first, tmp_path / "second"))
    for name, weight in a.vae.state_dict().items():
        assert torch.equal(weight, b.vae.state_dict()[name]), name
    changed = [n for n, w in a.text_encoder.state_dict().items() if not torch.equal(w, b.text_encoder.state_dict()[n])]
    assert changed  # the continuation trained the text encoder
    record = json.loads((tmp_path / "second" / "toy_pretrain.json").read_text())
    assert record["init"] == str(first) and record["init_record"]["seed"] == 0
    assert record["config"]["rare_word_rate"] == 1.0


def test_init_must_be_a_saved_model_and_not_the_output(tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--init", str(tmp_path / "missing"), "--preset", "micro"])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--init", str(tmp_path / "m"), "--preset", "micro"])
