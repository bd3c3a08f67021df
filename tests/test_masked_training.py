"""Training with --masked_loss and varied captions: resumes bit for bit, the cached-latent path trains the same
run, the masks change what is learned, and a photo without a mask stops the run before the model loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from training_helpers import adapter_weights, forbid_model_load, make_photos, run_training, tiny_config

from moslora_diffusion.data import DatasetError
from moslora_diffusion.training import main

VARIED = dict(masked_loss=True, caption_dropout_rate=0.5, shuffle_caption=True, keep_tokens=1)


def _masked_photos(folder, count=3):
    """Noise photos with a left-half mask each, and comma-separated captions to shuffle."""
    make_photos(folder, count=count)
    for i in range(count):
        mask = Image.new("L", (40, 48), 0)
        mask.paste(255, (0, 0, 20 + 4 * i, 48))
        mask.save(folder / f"photo_{i}_mask.png")
        (folder / f"photo_{i}.txt").write_text(f"a photo of sks dog, sitting, photo {i}, outdoors\n")
    return folder


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_masked_run_ends_bit_for_bit_where_the_whole_run_does(tiny_sd15_dir, tmp_path):
    photos = _masked_photos(tmp_path / "photos")
    settings = dict(random_flip=True, checkpointing_steps=2, learning_rate=1e-3, **VARIED)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "whole", max_train_steps=4, **settings))
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "split", max_train_steps=2, **settings))
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "split", max_train_steps=4,
                                       resume_from_checkpoint="latest", **settings))
    assert resumed.resumed_from == 2
    whole = adapter_weights(tmp_path / "whole")
    assert _equal(whole, adapter_weights(tmp_path / "split"))
    assert any(whole[k].abs().max() > 0 for k in whole if k.endswith("moslora_B"))
    # The masks are what made this run: without them (same captions, same draws) it learns something else.
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "unmasked", max_train_steps=4,
                             **{**settings, "masked_loss": False}))
    assert not _equal(whole, adapter_weights(tmp_path / "unmasked"))


def test_cached_latents_carry_the_masks_and_captions_of_the_photo_batches(tiny_sd15_dir, tmp_path):
    """With a centre crop and no flip every epoch's crop is epoch 0's, so --cache_latents must train exactly the
    run the photo batches train (masks cached with their latents, captions drawn per epoch)."""
    photos = _masked_photos(tmp_path / "photos", count=2)
    settings = dict(center_crop=True, max_train_steps=4, train_batch_size=2, **VARIED)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "pixels", **settings))
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "cached", cache_latents=True, **settings))
    assert _equal(adapter_weights(tmp_path / "pixels"), adapter_weights(tmp_path / "cached"))


def test_a_photo_without_a_mask_stops_the_run_before_the_model_loads(tiny_sd15_dir, tmp_path, monkeypatch, capsys):
    photos = _masked_photos(tmp_path / "photos", count=2)
    (photos / "photo_1_mask.png").unlink()
    forbid_model_load(monkeypatch)
    with pytest.raises(DatasetError, match="no mask for photo_1.png"):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", masked_loss=True))
    argv = ["--pretrained_model_name_or_path", str(tiny_sd15_dir), "--instance_data_dir", str(photos),
            "--instance_prompt", "a photo of sks dog", "--masked_loss", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as status:
        main(argv)
    assert status.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --masked_loss: no mask for photo_1.png: put a <name>_mask.png beside each")
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


def test_every_subject_quality_feature_at_once_trains_and_resumes_bit_for_bit(tiny_sd15_dir, tmp_path):
    """Masked loss, varied captions, prior preservation from the base model and pivotal tuning in one run: the
    class rows the preservation adds get all-ones masks (one mask per row), and a resumed run ends where the
    whole run does, the learned trigger vectors included."""
    photos = _masked_photos(tmp_path / "photos")
    settings = dict(random_flip=True, checkpointing_steps=2, learning_rate=1e-3, train_batch_size=2,
                    with_prior_preservation=True, prior_source="base_model", class_prompt="a photo of a dog",
                    train_text_encoder=True, train_text_encoder_ti=True, token_abstraction="sks", **VARIED)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "whole", max_train_steps=4, **settings))
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "split", max_train_steps=2, **settings))
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "split", max_train_steps=4,
                             resume_from_checkpoint="latest", **settings))
    whole = adapter_weights(tmp_path / "whole")
    assert any(k.startswith("embeddings.") for k in whole)
    assert _equal(whole, adapter_weights(tmp_path / "split"))
    assert not (tmp_path / "photos" / "class_images").exists()
