"""Micro-batches for every rank: the same global batches whatever the number of processes.

We do not let accelerate shard the DataLoader, nor use BucketBatchSampler's own `num_replicas`: both give
rank r every N-th batch, so a 2-process run would put different images together than a 1-process run
with the same global batch. Instead every rank builds the global batch list (BucketBatchSampler with the
global batch size, seeded by (seed, epoch)) and keeps its slice of each global batch.

The stream is indexed by micro-step k from the start of training (epoch = k // batches_per_epoch), so a
resumed run starts exactly where the checkpoint left off, without loading the skipped images.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from ...data import BucketBatchSampler, DreamBoothDataset, collate


class GlobalBatchStream:
    """Yields this rank's [(epoch, dataset index), ...] for micro-steps start, start + 1, ... forever."""

    def __init__(self, bucket_ids: list[int], per_device: int, num_processes: int, process_index: int,
                 seed: int, start: int = 0):
        self.per_device, self.process_index, self.start = per_device, process_index, start
        self.global_batch = per_device * num_processes
        self.sampler = BucketBatchSampler(bucket_ids, self.global_batch, seed=seed, shuffle=True)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def global_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def _pad(self, batch: list[int]) -> list[int]:
        # A bucket's last batch may be short: repeat its own images so every rank gets b rows of one bucket.
        return [batch[i % len(batch)] for i in range(self.global_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        epoch, batches = None, []
        while True:
            this_epoch, position = divmod(step, self.batches_per_epoch)
            if this_epoch != epoch:
                epoch, batches = this_epoch, self.global_batches(this_epoch)
            full = self._pad(batches[position])
            first = self.process_index * self.per_device
            yield [(epoch, index) for index in full[first:first + self.per_device]]
            step += 1


class EpochIndexed(Dataset):
    """dataset[(epoch, index)]: the crop/flip of an item depends on its epoch, also inside worker processes."""

    def __init__(self, dataset: DreamBoothDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def pixel_batches(dataset: DreamBoothDataset, stream: GlobalBatchStream, with_prior: bool,
                  num_workers: int) -> Iterator[dict]:
    """Collated batches (pixel_values, prompts, SDXL sizes) in stream order, loaded in the background."""
    loader = DataLoader(EpochIndexed(dataset), batch_sampler=stream, num_workers=num_workers,
                        collate_fn=partial(collate, with_prior_preservation=with_prior),
                        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    return iter(loader)


class LatentCache:
    """VAE posteriors (mean, std) of every dataset item, computed before the steps (epoch 0's crop and flip).

    `encode` is the run's PosteriorMemo, so an image shared by several items is encoded once. Masks
    (--masked_loss) are kept with their latents, cropped alike; instance captions are drawn per (epoch, item),
    so caption dropout and shuffling vary as without the cache."""

    def __init__(self, dataset: DreamBoothDataset, with_prior: bool, encode):
        """encode(pixel_values (rows, 3, H, W)) -> (mean, std), each (rows, C, h, w)."""
        self.with_prior, self.dataset = with_prior, dataset
        self.items = []
        dataset.set_epoch(0)
        for index in range(len(dataset)):
            example = dataset[index]
            batch = collate([example], with_prior_preservation=with_prior)
            mean, std = encode(batch["pixel_values"])
            self.items.append((mean, std, batch))

    def batches(self, stream: GlobalBatchStream) -> Iterator[dict]:
        """Batches like `pixel_batches`, with `latent_mean`/`latent_std` in place of pixel values."""
        for keys in stream:
            rows = [self.items[index] for _, index in keys]
            groups = 2 if self.with_prior else 1
            # Each cached item holds its instance row then its class row: regroup to [instances..., classes...].
            order = [(item, g) for g in range(groups) for item in rows]
            stacked = [k for k in ("original_sizes", "crop_top_lefts", "target_sizes", "masks") if k in rows[0][2]]
            yield {
                "latent_mean": torch.cat([item[0][g:g + 1] for item, g in order]),
                "latent_std": torch.cat([item[1][g:g + 1] for item, g in order]),
                # the instance captions of this epoch (dropout and shuffle are not frozen at epoch 0 as the crops are)
                "prompts": [self.dataset.instance_caption(index, epoch) for epoch, index in keys]
                           + [item[2]["prompts"][1] for item in rows if groups == 2],
                **{key: torch.cat([item[2][key][g:g + 1] for item, g in order]) for key in stacked},
                "num_instance": len(rows),
            }
