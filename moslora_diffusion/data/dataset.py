"""The DreamBooth training dataset and its collate function.

Each item is an instance photo (and, with prior preservation, a class image alongside it, as in
diffusers' DreamBooth scripts), transformed to the target size, plus the SDXL micro-conditioning
(original size, crop top-left, target size) that transform implies.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .buckets import assign_bucket
from .captions import CaptionOptions, vary_caption
from .images import image_size, load_rgb
from .masks import load_mask, mask_to_tensor
from .scan import DatasetError, ImageRecord, scan_instance_folder
from .transforms import crop_and_flip, to_tensor

__all__ = ["DatasetError", "DreamBoothDataset", "ImageRecord", "collate", "scan_instance_folder"]

_SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def _class_records(class_records: Sequence[ImageRecord | str | Path], class_prompt: str | None) -> list[ImageRecord]:
    """Class images as records; `class_prompt`, when given, captions all of them."""
    prompt = (class_prompt or "").strip() or None
    records = []
    for item in class_records:
        if isinstance(item, ImageRecord):
            records.append(ImageRecord(item.path, prompt or item.caption, 1, item.size))
        elif prompt is None:
            raise DatasetError(f"class image {item} has no caption: give a class prompt")
        else:
            records.append(ImageRecord(Path(item), prompt))
    if not records:
        raise DatasetError("prior preservation needs class images, but none were given")
    return records


class DreamBoothDataset(Dataset):
    """Instance photos (expanded by their repeats), optionally paired with class images.

    Length is the total of instance repeats, or max(that, number of class images) when class
    images are given; each side cycles through its own list. All randomness (crop offset, flip)
    comes from a local rng seeded by (seed, epoch, index), so two processes, or two runs, build
    identical items. Call `set_epoch` each epoch (in the process that owns the dataset copy:
    DataLoader workers with `persistent_workers=True` keep the epoch they were started with).

    With `buckets` (a list of (h, w) from `make_buckets`), each instance photo is resized to
    cover its aspect-ratio bucket and cropped to it; its class partner is cropped to the same
    bucket so the two stack in one batch. Use `bucket_ids` with `BucketBatchSampler`.

    masked_loss: each instance item also holds "mask" (1, H, W) in [0, 1] (data/masks.py), cropped and
    flipped exactly as its photo. captions: dropout / shuffle of instance captions (data/captions.py).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_records: Sequence[ImageRecord | str | Path] | None = None,
        class_prompt: str | None = None,
        buckets: Sequence[tuple[int, int]] | None = None,
        seed: int = 0,
        masked_loss: bool = False,
        captions: CaptionOptions | None = None,
    ) -> None:
        if not records:
            raise DatasetError("no instance images to train on")
        if resolution <= 0:
            raise DatasetError(f"resolution must be positive, got {resolution}")
        self.records = list(records)
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.masked_loss = masked_loss
        self.captions = captions or CaptionOptions()
        self.epoch = 0
        self.class_records = None
        if class_records is not None:
            self.class_records = _class_records(class_records, class_prompt)
        # Instance item i -> record index; a record with repeats N appears N times.
        self._instance_items = [i for i, r in enumerate(self.records) for _ in range(r.repeats)]
        if not self._instance_items:
            raise DatasetError("every instance record has 0 repeats")
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self._record_buckets = self._assign_buckets() if self.buckets else None

    def _assign_buckets(self) -> list[int]:
        ids = []
        for record in self.records:
            width, height = record.size if record.size else image_size(record.path)
            ids.append(assign_bucket(width, height, self.buckets))
        return ids

    @property
    def num_instance_items(self) -> int:
        return len(self._instance_items)

    def __len__(self) -> int:
        if self.class_records is None:
            return self.num_instance_items
        return max(self.num_instance_items, len(self.class_records))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _record_index(self, index: int) -> int:
        return self._instance_items[index % self.num_instance_items]

    @property
    def bucket_ids(self) -> list[int]:
        """Bucket id of every item (all 0 without buckets), for `BucketBatchSampler`."""
        if self._record_buckets is None:
            return [0] * len(self)
        return [self._record_buckets[self._record_index(i)] for i in range(len(self))]

    def _target_size(self, record_index: int) -> tuple[int, int]:
        if self._record_buckets is None:
            return (self.resolution, self.resolution)
        return self.buckets[self._record_buckets[record_index]]

    def instance_caption(self, index: int, epoch: int) -> str:
        """The caption of instance item `index` in `epoch` (dropped or shuffled per `captions`)."""
        caption = self.records[self._record_index(index)].caption
        return vary_caption(caption, self.captions, self.seed, epoch, index)

    def _example(self, record: ImageRecord, target: tuple[int, int], rng_key: str, masked: bool = False) -> dict:
        # A string seed is hashed with SHA-512: stable across processes and PYTHONHASHSEED.
        rng = random.Random(f"{self.seed}:{self.epoch}:{rng_key}")
        mask_rng = random.Random()
        mask_rng.setstate(rng.getstate())  # the mask gets the very crop and flip its photo gets
        photo = load_rgb(record.path)
        result = crop_and_flip(photo, target, rng, self.center_crop, self.random_flip)
        extra = {}
        if masked:
            mask = crop_and_flip(load_mask(record.path, photo.size), target, mask_rng, self.center_crop,
                                 self.random_flip)
            extra["mask"] = mask_to_tensor(mask.image)
        return {
            **extra,
            "pixel_values": to_tensor(result.image),
            "prompt": record.caption,
            "original_size": result.original_size,
            "crop_top_left": result.crop_top_left,
            "target_size": result.target_size,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of length {len(self)}")
        record_index = self._record_index(index)
        target = self._target_size(record_index)
        example = self._example(self.records[record_index], target, f"instance:{index}", self.masked_loss)
        example["prompt"] = self.instance_caption(index, self.epoch)
        if self.class_records is not None:
            class_record = self.class_records[index % len(self.class_records)]
            class_example = self._example(class_record, target, f"class:{index}")
            example.update({f"class_{key}": value for key, value in class_example.items()})
        return example


def collate(examples: Sequence[dict], with_prior_preservation: bool = False) -> dict[str, Any]:
    """Stack dataset items into a batch.

    With prior preservation the batch is [instance rows..., class rows...] (diffusers' order,
    so the loss can be split with `chunk(2)`); `num_instance` says how many leading rows are
    instance examples, so Min-SNR weighting can be applied to that half only.
    Sizes come back as LongTensors (B, 2) in (h, w) / (top, left) order. Items with a "mask" give "masks"
    (B, 1, H, W); class rows are unmasked (ones).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    prefixes = ["", "class_"] if with_prior_preservation else [""]
    if with_prior_preservation and "class_pixel_values" not in examples[0]:
        raise ValueError("prior preservation needs a dataset built with class images")
    rows = [(example, prefix) for prefix in prefixes for example in examples]
    pixel_values = torch.stack([ex[f"{p}pixel_values"] for ex, p in rows])
    batch: dict[str, Any] = {
        "pixel_values": pixel_values.contiguous(memory_format=torch.contiguous_format).float(),
        "prompts": [ex[f"{p}prompt"] for ex, p in rows],
        "num_instance": len(examples),
    }
    for key in _SIZE_KEYS:
        values = [list(ex[f"{p}{key}"]) for ex, p in rows]
        batch[f"{key}s"] = torch.tensor(values, dtype=torch.long)
    if "mask" in examples[0]:
        ones = torch.ones_like(examples[0]["mask"])
        batch["masks"] = torch.stack([ex["mask"] if p == "" else ones for ex, p in rows])
    return batch
