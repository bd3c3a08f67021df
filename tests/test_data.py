"""Tests for the training data layer. Every image is built here, tiny, with PIL."""

from __future__ import annotations

import io
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.data import (
    BucketBatchSampler,
    DatasetError,
    DreamBoothDataset,
    ImageError,
    ImageRecord,
    assign_bucket,
    collate,
    crop_and_flip,
    ensure_class_images,
    list_image_files,
    load_rgb,
    make_buckets,
    scan_instance_folder,
)

RES = 32


def save(path: Path, size=(40, 40), color=(200, 30, 30), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def noise_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


class FixedRng(random.Random):
    """An rng whose crop offset and flip coin are chosen by the test."""

    def __init__(self, offset: int, coin: float) -> None:
        super().__init__(0)
        self.offset, self.coin = offset, coin

    def randint(self, a: int, b: int) -> int:
        return min(max(self.offset, a), b)

    def random(self) -> float:
        return self.coin


# --- images.py -------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 6, 6))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)

    loaded = load_rgb(path)
    assert loaded.size == (20, 40)
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert loaded.getpixel((18, 1))[0] > 200
    assert loaded.getpixel((1, 1))[0] < 50


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 4, 8))  # left half fully transparent (black underneath)
    loaded = load_rgb(save_img(img, tmp_path / "a.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((6, 1)) == (0, 0, 255)


def save_img(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


@pytest.mark.parametrize(
    ("mode", "color", "suffix", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), ".jpg", (255, 0, 0)),
        ("L", 128, ".png", (128, 128, 128)),
        ("P", 3, ".png", None),
        ("LA", (90, 255), ".png", (90, 90, 90)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, color, suffix, expected):
    path = save(tmp_path / f"img{suffix}", (8, 8), color, mode=mode)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)
    if expected is not None:
        assert np.allclose(loaded.getpixel((4, 4)), expected, atol=3)


def test_palette_transparency_becomes_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    loaded = load_rgb(path)
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((6, 1)) == (0, 255, 0)


def test_16bit_gradient_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    loaded = np.asarray(load_rgb(path))
    assert loaded.shape == (1, 4, 3)
    assert list(loaded[0, :, 0]) == [0, 128, 255, 4]
    # The same data as a 32-bit "I" image (how some decoders hand 16-bit files over).
    wide = np.asarray(load_rgb(save_img(Image.fromarray(values.astype(np.int32)), tmp_path / "i.tif")))
    assert list(wide[0, :, 0]) == [0, 128, 255, 4]


def test_float_image_becomes_rgb(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    loaded = np.asarray(load_rgb(save_img(img, tmp_path / "f.tif")))
    assert list(loaded[0, :, 1]) == [0, 128, 255]


def test_list_image_files_decides_by_content_and_sorts(tmp_path):
    for name, fmt in [("b.PNG", "PNG"), ("a.jpeg", "JPEG"), ("c.webp", "WEBP"), (".hidden.jpg", "JPEG"),
                      ("d.Tiff", "TIFF"), ("e.jfif", "JPEG"), ("f.gif", "GIF")]:
        save(tmp_path / name, format=fmt)
    for name in ["._a.jpg", "notes.txt", "fake.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpeg", "b.PNG", "c.webp", "d.Tiff", "e.jfif", "f.gif"]


def test_corrupt_file_raises_image_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ImageError, match="broken.png"):
        load_rgb(bad)
    assert issubclass(ImageError, ValueError)


# --- scanning --------------------------------------------------------------------------------


def test_captions_sidecars_and_repeat_folders(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("  caption of a \n", encoding="utf-8")
    save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("\ufefftxt caption of b\nsecond line", encoding="utf-8")
    save(tmp_path / "c.png")
    save(tmp_path / "3_sks dog" / "d.png")
    save(tmp_path / "3_sks dog" / "e.png")
    (tmp_path / "3_sks dog" / "e.caption").write_text("sidecar beats folder")
    save(tmp_path / "both.png")
    (tmp_path / "both.caption").write_text("from caption")
    (tmp_path / "both.txt").write_text("from txt")

    records = {r.path.name: r for r in scan_instance_folder(tmp_path, "a photo of sks dog")}
    assert records["a.png"].caption == "caption of a"
    assert records["b.jpg"].caption == "txt caption of b"
    assert records["both.png"].caption == "from caption"
    assert (records["c.png"].caption, records["c.png"].repeats) == ("a photo of sks dog", 1)
    assert (records["d.png"].caption, records["d.png"].repeats) == ("sks dog", 3)
    assert (records["e.png"].caption, records["e.png"].repeats) == ("sidecar beats folder", 3)
    assert records["a.png"].size == (40, 40)

    dataset = DreamBoothDataset(list(records.values()), RES)
    assert len(dataset) == 1 + 1 + 1 + 1 + 3 + 3


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_instance_folder(tmp_path / "nope", "p")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_instance_folder(save(tmp_path / "file.png"), "p")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        scan_instance_folder(empty, "p")
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no image files"):
        scan_instance_folder(empty, "p")
    (empty / "fake.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="fake.jpg"), pytest.raises(DatasetError, match="readable"):
        scan_instance_folder(empty, "p")


def test_truncated_jpeg_is_skipped_with_warning(tmp_path):
    save(tmp_path / "good.png")
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="cut.jpg"):
        records = scan_instance_folder(tmp_path, "sks dog")
    assert [r.path.name for r in records] == ["good.png"]


def test_missing_prompt_names_the_image(tmp_path):
    save(tmp_path / "with.png")
    (tmp_path / "with.txt").write_text("has one")
    save(tmp_path / "without.png")
    with pytest.raises(DatasetError, match="without.png"):
        scan_instance_folder(tmp_path, None)
    (tmp_path / "without.caption").write_text("now it has one")
    assert len(scan_instance_folder(tmp_path, "")) == 2


# --- transforms ------------------------------------------------------------------------------


def test_items_are_normalised_tensors_with_center_crop_coordinates(tmp_path):
    path = noise_image(tmp_path / "wide.png", (80, 40))
    dataset = DreamBoothDataset([ImageRecord(path, "sks dog")], RES, center_crop=True)
    item = dataset[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, RES, RES) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.9 and pixels.max() > 0.9
    # 80x40 -> 64x32 (shorter side to 32), centre crop of width 32 starts at (64 - 32) / 2.
    assert item["original_size"] == (40, 80)
    assert item["crop_top_left"] == (0, 16)
    assert item["target_size"] == (RES, RES)
    assert item["prompt"] == "sks dog"


def test_flip_mirrors_crop_left():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    kept = crop_and_flip(img, (32, 32), FixedRng(offset=8, coin=0.9), random_flip=True)
    flipped = crop_and_flip(img, (32, 32), FixedRng(offset=8, coin=0.1), random_flip=True)
    assert kept.crop_top_left == (0, 8)
    assert flipped.crop_top_left == (0, 64 - 8 - 32)
    assert np.array_equal(np.asarray(flipped.image), np.asarray(kept.image)[:, ::-1])


def test_randomness_is_reproducible_and_epoch_dependent(tmp_path):
    path = noise_image(tmp_path / "wide.png", (200, 40))
    records = [ImageRecord(path, "sks dog", repeats=2)]

    def build():
        return DreamBoothDataset(records, RES, random_flip=True, seed=7)

    random.seed(1)
    torch.manual_seed(1)
    first = build()[1]
    random.seed(2)  # the global RNG must not matter: workers and ranks seed it differently
    torch.manual_seed(2)
    second = build()[1]
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert first["crop_top_left"] == second["crop_top_left"]

    dataset = build()
    later = []
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        later.append(dataset[1]["pixel_values"])
    assert any(not torch.equal(first["pixel_values"], other) for other in later)


# --- buckets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (RES, 8)])
def test_buckets_are_step_multiples_within_area(resolution, step):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) > 3
    for height, width in buckets:
        assert height % step == 0 and width % step == 0
        assert height * width <= resolution * resolution


def test_wide_image_goes_to_wide_bucket():
    buckets = make_buckets(512)
    height, width = buckets[assign_bucket(1024, 512, buckets)]
    assert width > height and abs(width / height - 2) < 0.3
    assert buckets[assign_bucket(512, 512, buckets)] == (512, 512)
    tall_h, tall_w = buckets[assign_bucket(300, 600, buckets)]
    assert (tall_h, tall_w) == (width, height)


def test_dataset_crops_to_bucket_and_class_follows(tmp_path):
    wide = noise_image(tmp_path / "wide.png", (64, 32))
    square = noise_image(tmp_path / "square.png", (32, 32), seed=1)
    class_image = noise_image(tmp_path / "class" / "c.png", (30, 30), seed=2)
    buckets = make_buckets(RES)
    dataset = DreamBoothDataset(
        [ImageRecord(wide, "w"), ImageRecord(square, "s")],
        RES,
        class_records=[class_image],
        class_prompt="a dog",
        buckets=buckets,
    )
    wide_item = dataset[0]
    bucket = buckets[dataset.bucket_ids[0]]
    assert wide_item["target_size"] == bucket and bucket[1] > bucket[0]
    assert wide_item["pixel_values"].shape == (3, *bucket)
    assert wide_item["class_pixel_values"].shape == (3, *bucket)
    assert wide_item["class_target_size"] == bucket
    assert dataset[1]["target_size"] == (RES, RES)


def test_sampler_groups_buckets_covers_all_and_is_deterministic():
    bucket_ids = [0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 2, 2, 1]
    sampler = BucketBatchSampler(bucket_ids, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({bucket_ids[i] for i in batch}) == 1
    assert sorted(i for batch in batches for i in batch) == list(range(len(bucket_ids)))
    assert list(BucketBatchSampler(bucket_ids, 2, seed=3)) == batches
    orders = []
    for epoch in range(1, 4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert any(order != batches for order in orders)


def test_sampler_ranks_get_disjoint_equal_shares():
    bucket_ids = [i % 3 for i in range(24)]  # 3 buckets x 8 items -> 12 batches of 2
    shares = [list(BucketBatchSampler(bucket_ids, 2, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    flat = [sorted(i for batch in share for i in batch) for share in shares]
    assert len(shares[0]) == len(shares[1]) == 6
    assert not set(flat[0]) & set(flat[1])
    assert sorted(flat[0] + flat[1]) == list(range(24))
    # An odd number of batches is padded so both ranks run the same number of steps.
    uneven = [BucketBatchSampler(bucket_ids[:8], 2, num_replicas=2, rank=r) for r in (0, 1)]  # 5 batches
    assert len(list(uneven[0])) == len(list(uneven[1])) == len(uneven[0]) == 3


# --- class images ----------------------------------------------------------------------------


class FakeGenerator:
    def __init__(self):
        self.calls, self.seeds = 0, []

    def __call__(self, prompts, seeds):
        self.calls += len(prompts)
        self.seeds += seeds
        return [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]


def test_class_images_generate_only_missing_and_resume(tmp_path):
    class_dir = tmp_path / "class"
    save(class_dir / "user_1.jpg", (8, 8))
    save(class_dir / "user_2.png", (8, 8))
    leftover = class_dir / ".class_00003_13.png.99999999-x1y2z3w4.tmp"  # a killed run's, pid gone for minutes
    leftover.write_bytes(b"half written")
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    (class_dir / "class_00000_10.png").write_bytes(b"corrupt png")
    generator, progress = FakeGenerator(), []

    with pytest.warns(UserWarning, match="class_00000_10.png"):
        paths = ensure_class_images(
            class_dir,
            "a dog",
            5,
            generator,
            batch_size=2,
            seed=10,
            progress=lambda done, total: progress.append((done, total)),
        )
    assert generator.calls == 3
    assert generator.seeds == [11, 12, 13]  # index 0 is taken by the corrupt file
    assert progress == [(2, 3), (3, 3)]
    assert len(paths) == 5 and all(p.exists() for p in paths)
    assert (class_dir / "class_00001_11.png").exists()
    assert not list(class_dir.glob("*.tmp"))

    again = FakeGenerator()
    with pytest.warns(UserWarning):
        assert len(ensure_class_images(class_dir, "a dog", 5, again, seed=10)) == 5
    assert again.calls == 0


def test_class_images_create_folder_and_reject_bad_arguments(tmp_path):
    generator = FakeGenerator()
    paths = ensure_class_images(tmp_path / "new" / "dir", "a cat", 2, generator)
    assert [p.name for p in paths] == ["class_00000_0.png", "class_00001_1.png"]
    with pytest.raises(ValueError, match="num_class_images"):
        ensure_class_images(tmp_path / "x", "a cat", 0, generator)
    with pytest.raises(ValueError, match="class prompt"):
        ensure_class_images(tmp_path / "x", "  ", 3, generator)


def test_failed_write_leaves_no_partial_file(tmp_path):
    class Exploding:
        def save(self, fp, format):  # noqa: A002 - mirrors PIL's signature
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(tmp_path, "a cat", 1, lambda prompts, seeds: [Exploding()])
    assert list(tmp_path.iterdir()) == []


# --- collate ---------------------------------------------------------------------------------


def test_collate_puts_instance_rows_first(tmp_path):
    instance = noise_image(tmp_path / "inst.png", (40, 32))
    classes = [noise_image(tmp_path / "cls" / f"{i}.png", (32, 32), seed=i) for i in range(3)]
    dataset = DreamBoothDataset([ImageRecord(instance, "sks dog")], RES, class_records=classes, class_prompt="a dog")
    assert len(dataset) == 3  # max(1 instance item, 3 class images)
    examples = [dataset[i] for i in range(3)]
    batch = collate(examples, with_prior_preservation=True)
    assert batch["num_instance"] == 3
    assert batch["prompts"] == ["sks dog"] * 3 + ["a dog"] * 3
    assert batch["pixel_values"].shape == (6, 3, RES, RES)
    assert torch.equal(batch["pixel_values"][0], examples[0]["pixel_values"])
    assert torch.equal(batch["pixel_values"][3], examples[0]["class_pixel_values"])
    assert batch["original_sizes"].dtype == torch.long
    assert batch["original_sizes"][0].tolist() == [32, 40]
    assert batch["original_sizes"][3].tolist() == [32, 32]
    assert batch["crop_top_lefts"].shape == batch["target_sizes"].shape == (6, 2)

    plain = collate(examples, with_prior_preservation=False)
    assert plain["pixel_values"].shape[0] == plain["num_instance"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="class images"):
            collate([{k: v for k, v in examples[0].items() if not k.startswith("class_")}], True)
