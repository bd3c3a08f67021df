"""--caption_dropout_rate, --shuffle_caption, --keep_tokens: drawn per (seed, epoch, item) like the crops; class
captions never change; a latent cache hands out the same captions as the photo batches."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_helpers import tiny_config

from moslora_diffusion.data import CaptionOptions, DreamBoothDataset, ImageRecord
from moslora_diffusion.data.captions import vary_caption
from moslora_diffusion.training.settings.config import ConfigError
from moslora_diffusion.training.step.batches import GlobalBatchStream, LatentCache, pixel_batches

CAPTION = "sks dog, on a beach, sunny, wide shot, film grain"


def _dataset(tmp_path: Path, items: int, options: CaptionOptions, seed: int = 0, **kwargs) -> DreamBoothDataset:
    photo = tmp_path / "p.png"
    if not photo.exists():
        Image.new("RGB", (32, 32), (10, 200, 30)).save(photo)
    return DreamBoothDataset([ImageRecord(photo, CAPTION, items, (32, 32))], 32, seed=seed, captions=options, **kwargs)


def test_caption_dropout_rate_lies_in_its_binomial_range_and_is_deterministic(tmp_path):
    n, p = 2000, 0.3
    dataset = _dataset(tmp_path, n, CaptionOptions(dropout_rate=p))
    dropped = [dataset.instance_caption(i, epoch=0) == "" for i in range(n)]
    # 99.9% two-sided binomial range: mean +- 3.29 standard deviations (600 +- 67)
    spread = 3.29 * math.sqrt(n * p * (1 - p))
    assert n * p - spread <= sum(dropped) <= n * p + spread
    kept = {dataset.instance_caption(i, 0) for i in range(n)} - {""}
    assert kept == {CAPTION}
    again = _dataset(tmp_path, n, CaptionOptions(dropout_rate=p))  # another process, or a resumed run
    assert [again.instance_caption(i, 0) == "" for i in range(n)] == dropped
    next_epoch = [dataset.instance_caption(i, 1) == "" for i in range(n)]
    other_seed = _dataset(tmp_path, n, CaptionOptions(dropout_rate=p), seed=1)
    assert next_epoch != dropped and [other_seed.instance_caption(i, 0) == "" for i in range(n)] != dropped
    assert all(_dataset(tmp_path, 50, CaptionOptions(dropout_rate=1.0)).instance_caption(i, 0) == ""
               for i in range(50))


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_shuffle_keeps_the_first_n_parts_and_every_part(tmp_path, keep):
    dataset = _dataset(tmp_path, 200, CaptionOptions(shuffle=True, keep_tokens=keep))
    parts = [p.strip() for p in CAPTION.split(",")]
    captions = [dataset.instance_caption(i, 0) for i in range(200)]
    for caption in captions:
        got = caption.split(", ")
        assert got[:keep] == parts[:keep] and Counter(got) == Counter(parts)
    assert len(set(captions)) >= min(math.factorial(len(parts) - keep), 20)  # really shuffled: 3! to 5! orders
    assert captions == [dataset.instance_caption(i, 0) for i in range(200)]


def test_empty_tags_of_a_trailing_or_doubled_comma_are_dropped_not_shuffled_in():
    caption = "sks dog, red collar,, on grass,"
    results = {vary_caption(caption, CaptionOptions(shuffle=True, keep_tokens=1), 0, 0, index) for index in range(40)}
    assert results == {"sks dog, red collar, on grass", "sks dog, on grass, red collar"}  # both orders, nothing empty


def test_items_carry_the_varied_caption_and_class_captions_never_vary(tmp_path):
    options = CaptionOptions(dropout_rate=0.5, shuffle=True, keep_tokens=1)
    dataset = _dataset(tmp_path, 40, options, class_records=[tmp_path / "p.png"], class_prompt="a dog, outdoors")
    dataset.set_epoch(2)
    items = [dataset[i] for i in range(40)]
    assert [item["prompt"] for item in items] == [dataset.instance_caption(i, 2) for i in range(40)]
    assert {item["class_prompt"] for item in items} == {"a dog, outdoors"}
    assert "" in {item["prompt"] for item in items}


def test_a_latent_cache_gives_each_epoch_the_captions_of_the_photo_batches(tmp_path):
    """The latents are frozen at epoch 0, the captions are not: cached and uncached batches carry the same
    prompts step after step."""
    dataset = _dataset(tmp_path, 6, CaptionOptions(dropout_rate=0.4, shuffle=True))

    def encode(pixels):
        return pixels[:, :, ::8, ::8], torch.ones_like(pixels[:, :, ::8, ::8])

    cache = LatentCache(dataset, with_prior=False, encode=encode)
    cached = cache.batches(GlobalBatchStream(dataset.bucket_ids, 2, 1, 0, seed=0))
    photos = pixel_batches(dataset, GlobalBatchStream(dataset.bucket_ids, 2, 1, 0, seed=0), False, 0)
    prompts = [(next(cached)["prompts"], next(photos)["prompts"]) for _ in range(9)]  # three epochs
    assert all(a == b for a, b in prompts)
    assert len({tuple(a) for a, _ in prompts}) > 3


def test_caption_settings_are_range_checked(tmp_path):
    with pytest.raises(ConfigError, match="--caption_dropout_rate"):
        tiny_config(tmp_path, tmp_path, tmp_path / "o", caption_dropout_rate=1.5)
    with pytest.raises(ConfigError, match="--keep_tokens"):
        tiny_config(tmp_path, tmp_path, tmp_path / "o", keep_tokens=-1)


def test_flags_that_act_only_with_another_are_refused_alone(tmp_path):
    """--keep_tokens without --shuffle_caption and --prior_source base_model without --with_prior_preservation used to
    train silently without what was asked."""
    with pytest.raises(ConfigError, match=r"^--keep_tokens .*: add --shuffle_caption, or drop it$"):
        tiny_config(tmp_path, tmp_path, tmp_path / "o", keep_tokens=2)
    with pytest.raises(ConfigError, match=r"^--prior_source base_model applies to prior preservation only: add "
                                          r"--with_prior_preservation"):
        tiny_config(tmp_path, tmp_path, tmp_path / "o", prior_source="base_model", class_prompt="a photo of a dog")
    tiny_config(tmp_path, tmp_path, tmp_path / "o", keep_tokens=2, shuffle_caption=True)
    tiny_config(tmp_path, tmp_path, tmp_path / "o", prior_source="base_model", with_prior_preservation=True,
                class_prompt="a photo of a dog")
