"""Resize, crop, flip and tensor conversion for one training image.

Pure functions of (image, target size, rng): the dataset owns the rng, so the same
(seed, epoch, index) always gives the same crop and flip in every process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class CropResult:
    """A transformed image plus the SDXL micro-conditioning it implies (all (h, w) / (top, left))."""

    image: Image.Image
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def resize_to_cover(img: Image.Image, target_hw: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `target_hw` (for a square target: shorter side = target).

    LANCZOS when shrinking (sharp, little aliasing on big phone photos), BICUBIC when enlarging.
    """
    target_h, target_w = target_hw
    width, height = img.size
    scale = max(target_h / height, target_w / width)
    # max() guards against rounding one pixel short of the crop size.
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    if (new_w, new_h) == (width, height):
        return img
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize((new_w, new_h), resample=resample)


def crop_and_flip(
    img: Image.Image,
    target_hw: tuple[int, int],
    rng: random.Random,
    center_crop: bool = False,
    random_flip: bool = False,
) -> CropResult:
    """Resize to cover `target_hw`, crop to it (center or random), maybe flip horizontally.

    The rng draws happen in a fixed order (crop, then flip) so results depend only on the seed.
    """
    original_size = (img.height, img.width)
    resized = resize_to_cover(img, target_hw)
    target_h, target_w = target_hw
    spare_h, spare_w = resized.height - target_h, resized.width - target_w
    if center_crop:
        # Same rounding as torchvision's CenterCrop, which diffusers' scripts use.
        top, left = int(round(spare_h / 2.0)), int(round(spare_w / 2.0))
    else:
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    if random_flip and rng.random() < 0.5:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # The flipped crop is the crop of the flipped image at the mirrored offset; SDXL is
        # conditioned on that offset (as diffusers' SDXL scripts do).
        left = resized.width - left - target_w
    return CropResult(cropped, original_size, (top, left), (target_h, target_w))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    array = np.array(img.convert("RGB"), dtype=np.float32)  # (H, W, 3), 0..255, writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return tensor.div_(127.5).sub_(1.0)
