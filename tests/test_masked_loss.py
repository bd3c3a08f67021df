"""--masked_loss: the mask really zeroes the loss outside the subject, follows its photo through crop and flip,
comes from a `<name>_mask.png` or the photo's alpha, and a photo without one is refused before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.data import DatasetError, DreamBoothDataset, check_masks, collate, mask_source, scan_photos
from moslora_diffusion.training.run_folder.identity import folder_fingerprint
from moslora_diffusion.training.step.masking import latent_masks
from moslora_diffusion.training.step.objective import diffusion_loss

ALPHAS = torch.linspace(0.999, 0.01, 1000)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _loss(pred, target, masks, num_instance=2, snr_gamma=None):
    return diffusion_loss(pred, target, torch.tensor([10, 500, 900, 100])[:pred.shape[0]], num_instance, ALPHAS,
                          "epsilon", snr_gamma, 1.0, masks)


def _left_half_masks(rows: int) -> torch.Tensor:
    masks = torch.zeros(rows, 1, 64, 64)
    masks[..., :32] = 1.0  # pixel columns 0..31 = latent columns 0..3 (the VAE's factor 8)
    return masks


def test_outside_the_mask_neither_loss_nor_gradient_changes_inside_both_do():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    masks = _left_half_masks(2)

    def loss_and_grad(t):
        pred.grad = None
        loss = _loss(pred, t, masks)
        loss.backward()
        return loss.detach(), pred.grad.clone()

    base_loss, base_grad = loss_and_grad(target)
    outside = target.clone()
    outside[..., 4:] += 10 * torch.randn(2, 4, 8, 4, generator=gen)
    loss, grad = loss_and_grad(outside)
    assert torch.equal(loss, base_loss) and torch.equal(grad, base_grad)
    assert torch.equal(base_grad[..., 4:], torch.zeros_like(base_grad[..., 4:]))  # no gradient to the background
    assert base_grad[..., :4].abs().min() > 0
    inside = target.clone()
    inside[..., :4] += 0.5
    loss, grad = loss_and_grad(inside)
    assert abs(loss.item() - base_loss.item()) > 1e-3 and not torch.allclose(grad, base_grad)
    # The weighted mean over the subject's latents (kohya's mean(m * e) would be half of it here).
    expected = (pred.detach() - target).pow(2)[..., :4].mean()
    assert base_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_an_all_white_mask_is_the_plain_loss_with_min_snr_and_prior_rows():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    plain = _loss(pred, target, None, num_instance=2, snr_gamma=5.0)
    ones = _loss(pred, target, torch.ones(4, 1, 64, 64), num_instance=2, snr_gamma=5.0)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6) and plain.item() > 0


def test_the_mask_is_area_averaged_to_the_latent_grid_and_an_empty_crop_scores_zero():
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., :8, :4] = 1.0  # half of the first 8 x 8 block
    assert latent_masks(masks, (2, 2))[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    pred = torch.randn(1, 4, 2, 2)
    assert _loss(pred, torch.zeros_like(pred), torch.zeros(1, 1, 16, 16), num_instance=1).item() == 0.0


def _photo_with_mask(folder, name="subject", size=(80, 64), box=(10, 12, 34, 40)):
    """A blue photo with a red rectangle at `box` (left, top, right, bottom) and the mask of that rectangle."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.new("RGB", size, BLUE)
    photo.paste(RED, box)
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    photo.save(folder / f"{name}.png")
    mask.save(folder / f"{name}_mask.png")
    return folder


def _assert_mask_on_red(item):
    red = (item["pixel_values"][0] > 0.9) & (item["pixel_values"][2] < -0.9)  # (H, W)
    blue = (item["pixel_values"][2] > 0.9) & (item["pixel_values"][0] < -0.9)
    mask = item["mask"][0]
    assert mask.shape == red.shape and mask.min() >= 0 and mask.max() <= 1
    assert bool(red[mask > 0.99].all()) and bool(blue[mask < 0.01].all())
    assert (mask > 0.99).sum() > 20 and red.sum() <= (mask > 0.5).sum() + 2 * mask.shape[0]
    return mask


@pytest.mark.parametrize("buckets", [None, [(40, 32)]])  # a bucket taller than the photo: crops across
def test_the_mask_follows_its_photo_through_random_crop_and_flip(tmp_path, buckets):
    folder = _photo_with_mask(tmp_path / "photos")
    records = scan_photos(folder, "a photo of sks dog").records
    dataset = DreamBoothDataset(records * 8, 32, random_flip=True, buckets=buckets, seed=3, masked_loss=True)
    masks = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        masks += [_assert_mask_on_red(dataset[i]) for i in range(len(dataset))]
    placements = {tuple(np.argwhere(m.numpy() > 0.99).min(axis=0)) for m in masks}
    assert len(placements) >= 3  # crops and flips moved the subject, and its mask with it


def test_the_alpha_channel_is_the_mask_and_the_photo_is_composited_on_white(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgba = Image.new("RGBA", (48, 48), (0, 0, 255, 0))
    rgba.paste((255, 0, 0, 255), (8, 8, 24, 40))
    rgba.save(folder / "cutout.png")
    records = scan_photos(folder, "a photo of sks dog").records
    assert mask_source(records[0].path) == "alpha"
    check_masks(records)
    item = DreamBoothDataset(records, 48, center_crop=True, masked_loss=True)[0]
    expected = torch.zeros(48, 48)
    expected[8:40, 8:24] = 1.0
    assert torch.equal(item["mask"][0], expected)
    assert torch.equal(item["pixel_values"][:, 0, 0], torch.ones(3))  # transparent -> white, as without a mask


def test_class_rows_are_unmasked_in_the_batch(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos", size=(32, 32), box=(0, 0, 16, 32))
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), RED).save(class_dir / "c.png")
    dataset = DreamBoothDataset(scan_photos(folder, "sks").records, 32, class_records=[class_dir / "c.png"],
                                class_prompt="a dog", masked_loss=True)
    batch = collate([dataset[0]], with_prior_preservation=True)
    assert batch["masks"].shape == (2, 1, 32, 32)
    assert batch["masks"][0, 0, :, :16].min() == 1 and batch["masks"][0, 0, :, 16:].max() == 0
    assert torch.equal(batch["masks"][1], torch.ones(1, 32, 32))


def test_photos_without_a_mask_are_named_in_one_line(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos")
    Image.new("RGB", (40, 40), RED).save(folder / "plain.jpg")
    Image.new("RGB", (40, 40), BLUE).save(folder / "other.png")
    with pytest.raises(DatasetError) as err:
        check_masks(scan_photos(folder, "sks").records)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--masked_loss: no mask for other.png, plain.jpg: put a ")
    assert "subject" not in message.split(":")[1]  # the photo that has its mask is not named


def test_a_mask_of_another_shape_is_refused_and_one_of_the_photos_shape_resized(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos", size=(80, 64))
    Image.new("L", (40, 32), 255).save(folder / "subject_mask.png")  # half size: resized
    check_masks(scan_photos(folder, "sks").records)
    Image.new("L", (64, 64), 255).save(folder / "subject_mask.png")
    with pytest.raises(DatasetError, match=r"mask .*subject_mask.png is 64x64 but its photo is 80x64"):
        check_masks(scan_photos(folder, "sks").records)


def test_the_run_identity_notices_a_changed_mask(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos")
    before = folder_fingerprint(str(folder))
    Image.new("L", (80, 64), 255).save(folder / "subject_mask.png")
    assert folder_fingerprint(str(folder)) != before


def test_an_all_black_mask_or_fully_transparent_photo_is_refused_naming_it(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos")
    Image.new("L", (80, 64), 0).save(folder / "subject_mask.png")  # inverted or empty: would train nothing
    with pytest.raises(DatasetError, match=r"^--masked_loss: the mask subject_mask.png marks no subject"):
        check_masks(scan_photos(folder, "sks").records)
    (folder / "subject_mask.png").unlink()
    Image.new("RGBA", (80, 64), (255, 0, 0, 0)).save(folder / "subject.png")
    with pytest.raises(DatasetError, match=r"the alpha channel of subject.png marks no subject"):
        check_masks(scan_photos(folder, "sks").records)
    mask = Image.new("L", (80, 64), 0)
    mask.putpixel((5, 5), 1)  # one faint pixel of subject is still a subject
    mask.save(folder / "subject_mask.png")
    check_masks(scan_photos(folder, "sks").records)


def test_a_mask_whose_photo_is_missing_is_named_as_such_not_as_a_photo_without_mask(tmp_path):
    folder = _photo_with_mask(tmp_path / "photos")
    Image.new("L", (80, 64), 255).save(folder / "other_mask.png")  # other.png was renamed or not copied
    with pytest.raises(DatasetError, match=r"^--masked_loss: other_mask.png looks like a mask but its photo other\.\* "
                                           r"is missing"):
        check_masks(scan_photos(folder, "sks").records)


def test_a_colour_mask_file_is_read_by_luminance_with_a_warning_naming_it(tmp_path):
    """A grey mask saved as RGB (what many editors write) is read silently; a colour one is used by its luminance,
    and the user is told which file it is."""
    import warnings

    folder = _photo_with_mask(tmp_path / "photos")
    Image.new("RGB", (80, 64), (200, 200, 200)).save(folder / "subject_mask.png")  # grey, stored as RGB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_masks(scan_photos(folder, "sks").records)
    colour = np.zeros((64, 80, 3), np.uint8)
    colour[:, :32] = (255, 0, 0)  # the subject painted red
    Image.fromarray(colour).save(folder / "subject_mask.png")
    with pytest.warns(UserWarning, match="mask subject_mask.png is a colour image; its luminance is the mask"):
        check_masks(scan_photos(folder, "sks").records)

