"""Aspect-ratio bucketing, as kohya's `--enable_bucket`.

Instead of cropping every photo to a square (which cuts the head off a standing person), each
photo goes to the bucket (h, w) of about the same pixel count whose aspect ratio is closest to
its own. A batch must hold one bucket only, so the sampler groups indices by bucket.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def default_bucket_step(resolution: int) -> int:
    """64 px (kohya's default, keeps latents divisible by 8) unless the resolution is tiny."""
    return 64 if resolution >= 256 else 8


def make_buckets(
    resolution: int,
    min_size: int | None = None,
    max_size: int | None = None,
    step: int | None = None,
) -> list[tuple[int, int]]:
    """Bucket sizes (h, w), sorted, each side a multiple of `step`, area <= resolution**2.

    Defaults: step 64 (8 below 256 px), min_size min(256, resolution // 2), max_size
    2 * resolution. Same construction as kohya's `make_bucket_resolutions`: for every width,
    the largest step-multiple height that fits the area budget, plus its transpose.
    """
    step = default_bucket_step(resolution) if step is None else step
    min_size = min(256, resolution // 2) if min_size is None else min_size
    max_size = 2 * resolution if max_size is None else max_size
    if step <= 0 or resolution < step:
        raise ValueError(f"resolution {resolution} must be >= bucket step {step} > 0")
    min_size = max(step, math.ceil(min_size / step) * step)
    max_size = (max_size // step) * step
    if min_size > max_size:
        raise ValueError(f"bucket min_size {min_size} exceeds max_size {max_size}")

    max_area = resolution * resolution
    side = (resolution // step) * step
    buckets = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket (h, w) whose aspect ratio is closest to width/height.

    Distance is |log(w/h) - log(bw/bh)| so 2:1 and 1:2 are equally far from square; ties go
    to the larger bucket (less upscaling).
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    log_ratio = math.log(width / height)

    def distance(i: int) -> tuple[float, int]:
        bucket_h, bucket_w = buckets[i]
        return abs(log_ratio - math.log(bucket_w / bucket_h)), -bucket_h * bucket_w

    return min(range(len(buckets)), key=distance)


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices that all share a bucket id.

    Deterministic for a given (seed, epoch): call `set_epoch` before each epoch. With
    `num_replicas` > 1 every rank builds the same global batch list and takes every
    `num_replicas`-th batch from `rank`, so shares are disjoint; the list is first padded by
    repeating its first batches (or truncated with drop_last) so every rank runs the same number
    of steps, as torch's DistributedSampler does (DDP hangs when ranks disagree).
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, {num_replicas}")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        # String seeds hash with SHA-512 in `random`, so this is identical in every process.
        rng = random.Random(f"buckets:{self.seed}:{self.epoch}")
        groups: dict[int, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.bucket_ids):
            groups[bucket].append(index)
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        replicas = self.num_replicas
        if replicas == 1 or not batches:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) // replicas * replicas]
        else:
            padding = -len(batches) % replicas
            batches = batches + list(itertools.islice(itertools.cycle(batches), padding))
        return batches[self.rank :: replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._shard(self._global_batches())

    def __len__(self) -> int:
        counts: dict[int, int] = defaultdict(int)
        for bucket in self.bucket_ids:
            counts[bucket] += 1
        if self.drop_last:
            total = sum(count // self.batch_size for count in counts.values())
            return total // self.num_replicas
        total = sum(math.ceil(count / self.batch_size) for count in counts.values())
        return math.ceil(total / self.num_replicas)
