"""The on-disk latent cache: a later run on the same images and VAE reads what an earlier one encoded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from moslora_diffusion.training.step.posterior_store import PosteriorStore, prune, vae_fingerprint
from moslora_diffusion.training.step.posteriors import PosteriorMemo, encode_posterior
from tests.test_posteriors import tiny_vae
from tests.training_helpers import make_photos, run_training, tiny_config


def images(count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def memo_with_store(vae, root: Path) -> PosteriorMemo:
    return PosteriorMemo(vae, "cpu", store=PosteriorStore.for_vae(root, vae, "cpu"))


def test_a_later_memo_reads_the_earlier_posteriors_bit_for_bit(tmp_path):
    vae, rows = tiny_vae(), images()
    first = memo_with_store(vae, tmp_path)
    mean, std = first(torch.cat([rows, rows[:1]]))
    assert (first.encoded, first.reused) == (3, 1)
    first.persist()
    shards = list(tmp_path.glob("vae-*/cpu-float32/*.safetensors"))
    assert len(shards) == 1

    later = memo_with_store(vae, tmp_path)
    assert len(later.store) == 3
    again, again_std = later(rows.flip(0))
    assert (later.encoded, later.from_store) == (0, 3)
    assert torch.equal(again, mean[:3].flip(0)) and torch.equal(again_std, std[:3].flip(0))
    fresh, _ = encode_posterior(vae, rows[:1], "cpu")
    assert fresh.abs().mean() > 1e-3  # a real posterior, not zeros
    torch.testing.assert_close(again[2:], fresh, rtol=0, atol=0)
    later.persist()  # nothing new: no second shard
    assert len(list(tmp_path.glob("vae-*/*/*.safetensors"))) == 1


def test_other_encoder_weights_are_another_cache_but_the_decoder_does_not_matter(tmp_path):
    vae, rows = tiny_vae(), images()
    first = memo_with_store(vae, tmp_path)
    first(rows)
    first.persist()
    before = vae_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.1)
    assert vae_fingerprint(vae) == before
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.1)
    assert vae_fingerprint(vae) != before
    other = memo_with_store(vae, tmp_path)
    other(rows)
    assert (other.encoded, other.from_store) == (3, 0)


def test_a_damaged_shard_is_skipped_with_a_warning(tmp_path):
    vae, rows = tiny_vae(), images()
    first = memo_with_store(vae, tmp_path)
    first(rows)
    first.persist()
    folder = first.store.folder
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file")
    good = next(p for p in folder.glob("*.safetensors") if p.name != "garbage.safetensors")
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[:50])
    with pytest.warns(UserWarning, match="skipping unreadable"):
        later = memo_with_store(vae, tmp_path)
    later(rows)
    assert (later.encoded, later.from_store) == (0, 3)


def test_a_shard_deleted_after_the_scan_means_encoding_again(tmp_path):
    vae, rows = tiny_vae(), images(1)
    first = memo_with_store(vae, tmp_path)
    want, _ = first(rows)
    first.persist()
    later = memo_with_store(vae, tmp_path)
    for shard in later.store.folder.glob("*.safetensors"):
        shard.unlink()
    with pytest.warns(UserWarning, match="encoding instead"):
        got, _ = later(rows)
    assert later.encoded == 1 and torch.equal(got, want)


def test_an_unwritable_cache_warns_and_keeps_the_results(tmp_path):
    vae, rows = tiny_vae(), images(2)
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file")
    memo = memo_with_store(vae, blocker / "cache")
    mean, _ = memo(rows)
    with pytest.warns(UserWarning, match="could not write"):
        memo.persist()
    assert memo.encoded == 2 and torch.isfinite(mean).all()
    assert blocker.read_text().startswith("the cache folder")


def test_prune_drops_the_least_recently_used_shards_first(tmp_path):
    folder = tmp_path / "vae-x" / "cpu-float32"
    folder.mkdir(parents=True)
    shards = []
    for i in range(4):
        path = folder / f"s{i}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + i, 1000 + i))
        shards.append(path)
    os.utime(shards[0], (5000, 5000))  # read by a recent run: the newest now
    # Oldest first: s1 (kept: the shard just written), s2, s3; then the budget holds.
    removed = prune(tmp_path, budget_bytes=2500, keep=shards[1])
    assert removed == [shards[2], shards[3]]
    assert sorted(folder.iterdir()) == [shards[0], shards[1]]


def test_a_rerun_skips_the_encoder_and_learns_exactly_the_same(tmp_path, tiny_sd15_dir):
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    cache = tmp_path / "cache"
    first = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "a", max_train_steps=4,
                                     latent_cache_dir=str(cache)))
    assert (first.vae_encoded, first.vae_reused) == (2, 2)
    second = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", max_train_steps=4,
                                      latent_cache_dir=str(cache)))
    assert (second.vae_encoded, second.vae_reused) == (0, 4)
    assert second.losses == first.losses and len(set(first.losses)) > 1


def test_the_cache_can_be_switched_off(tmp_path, tiny_sd15_dir):
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        result = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / run, max_train_steps=2,
                                          latent_cache_dir=str(cache), latent_disk_cache=False))
        assert result.vae_encoded == 2
    assert not cache.exists()


def test_the_default_folder_follows_the_environment(tmp_path, monkeypatch, tiny_sd15_dir):
    monkeypatch.setenv("MOSLORA_CACHE_DIR", str(tmp_path / "env-cache"))
    photos = make_photos(tmp_path / "photos", count=1, size=(32, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1, report_to="none"))
    assert not [w for w in caught if "latent cache" in str(w.message)]  # a normal run: no complaint
    assert len(list((tmp_path / "env-cache" / "latents").glob("vae-*/cpu-float32/*.safetensors"))) == 1
