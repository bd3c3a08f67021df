"""PosteriorMemo: each distinct training image VAE-encoded once, with the encoder's own result."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

import moslora_diffusion.training.trainer.run as run_module
from moslora_diffusion.training.step.posteriors import PosteriorMemo, encode_posterior, pixel_key
from tests.training_helpers import make_photos, run_training, tiny_config


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()


def test_memo_matches_the_encoder_and_encodes_each_image_once():
    vae = tiny_vae()
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = torch.stack([a, b, a, a])  # repeats inside one batch
    memo = PosteriorMemo(vae, "cpu")
    mean, std = memo(batch)
    want_mean, want_std = encode_posterior(vae, batch, "cpu")  # one batched call, as without the memo
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, want_std, rtol=1e-5, atol=1e-6)
    assert mean.abs().mean() > 1e-3 and not torch.equal(mean[0], mean[1])  # a real, image-dependent posterior
    assert (memo.encoded, memo.reused) == (2, 2)
    again, _ = memo(torch.stack([b, a]))
    assert (memo.encoded, memo.reused) == (2, 4)
    assert torch.equal(again, mean[[1, 0]])  # answered from the memo, bit for bit


def test_a_new_crop_is_a_new_image():
    vae = tiny_vae()
    image = torch.rand(3, 16, 16)
    flipped = image.flip(-1)
    memo = PosteriorMemo(vae, "cpu")
    mean, _ = memo(torch.stack([image, flipped]))
    assert memo.encoded == 2
    assert not torch.allclose(mean[0], mean[1])
    assert pixel_key(image) != pixel_key(image.to(torch.float64))  # the dtype is part of the key


def test_budget_stops_storing_but_still_answers():
    vae = tiny_vae()
    image = torch.rand(3, 16, 16)
    memo = PosteriorMemo(vae, "cpu", budget_bytes=0)
    first, _ = memo(image[None])
    second, _ = memo(image[None])
    assert (memo.encoded, memo.reused, memo.stored_bytes) == (2, 0, 0)
    assert torch.equal(first, second)


def test_training_encodes_each_photo_once(tmp_path, tiny_sd15_dir, monkeypatch):
    """2 photos at their training size (no crop, no flip), batch 1 for 6 steps: 2 encodes, 4 reuses."""
    memos = []

    class RecordingMemo(PosteriorMemo):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            memos.append(self)

    monkeypatch.setattr(run_module, "PosteriorMemo", RecordingMemo)
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    result = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=6))
    assert result.steps == 6
    assert (memos[0].encoded, memos[0].reused) == (2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memo_on_cuda_stores_host_copies_and_answers_them_exactly():
    vae = tiny_vae().to("cuda")
    rows = (torch.rand(2, 3, 16, 16) * 2 - 1).to("cuda")
    memo = PosteriorMemo(vae, "cuda")
    first, _ = memo(rows)
    again, _ = memo(rows)
    assert (memo.encoded, memo.reused) == (2, 2) and again.device.type == "cuda"
    assert torch.equal(first, again) and first.abs().mean() > 1e-3
    assert all(mean.device.type == "cpu" and mean.is_pinned() for mean, _ in memo.stored.values())
