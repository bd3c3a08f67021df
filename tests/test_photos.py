"""One photo rule for the trainer and the app (data/images.py): content decides, very large photos are
downscaled with a note, huge ones refused with the reason, tiny ones flagged, masks and other files reported."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image, ImageFile
from training_helpers import run_training, tiny_config

from moslora_diffusion.app.uploads import check_image, photo_notes, stage_uploads
from moslora_diffusion.data import DatasetError, ImageError, inspect_photo, load_rgb, scan_photos

RED, GREEN, BLUE = (200, 20, 20), (20, 200, 20), (20, 20, 200)


def _save(path, color=RED, size=(64, 64), **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **kwargs)
    return path


def _animated_gif(path, colors=(GREEN, BLUE, RED)):
    frames = [Image.new("RGB", (64, 64), c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    return path


def _png_header(path, width, height):
    """A PNG whose header claims width x height with no pixel data (as a decompression bomb does)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    """What a user's folder holds: a JPEG named .jfif, an animated GIF, a PNG with its caption and its mask,
    a photo whose name merely ends in _mask, and a note."""
    folder = tmp_path / "photos"
    _save(folder / "a.jfif", RED, format="JPEG")
    _animated_gif(folder / "b.gif")
    _save(folder / "c.png", BLUE)
    (folder / "c.txt").write_text("a photo of sks dog on a chair")
    _save(folder / "c_mask.png", (255, 255, 255))
    _save(folder / "halloween_mask.jpg", GREEN, format="JPEG")  # no `halloween.*` beside it: a photo
    (folder / "notes.md").write_text("shot on my phone")
    return folder


def test_a_jfif_and_a_gif_are_used_and_counted_masks_and_notes_reported(mixed_folder):
    scan = scan_photos(mixed_folder, "a photo of sks dog")
    assert [r.path.name for r in scan.records] == ["a.jfif", "b.gif", "c.png", "halloween_mask.jpg"]
    assert {r.path.name: r.caption for r in scan.records}["c.png"] == "a photo of sks dog on a chair"
    assert {s.path.name: s.reason for s in scan.skipped} == {"notes.md": "not an image Pillow can read"}
    assert [p.name for p in scan.masks] == ["c_mask.png"]
    report = "\n".join(scan.report(resolution=64))
    assert report.startswith(f"Photos: 4 used from {mixed_folder}, 1 masks (<name>_mask files: used only with "
                             "--masked_loss), 1 files skipped")
    assert "skipped notes.md: not an image" in report and "skipped c_mask" not in report
    assert "note b.gif: 3 frames (an animation or pages): only the first is used" in report
    assert load_rgb(mixed_folder / "b.gif").getpixel((5, 5)) == GREEN  # the first frame
    assert load_rgb(mixed_folder / "a.jfif").getpixel((5, 5)) == pytest.approx(RED, abs=3)


def test_the_app_accepts_the_same_files_by_the_same_rule(mixed_folder, tmp_path):
    files = [mixed_folder / name for name in ("a.jfif", "b.gif", "c.png")]
    staged = stage_uploads(files, tmp_path / "staged").photos
    assert [(name, info.path.name, info.format) for name, info in staged] == [
        ("a.jfif", "photo_000.jpg", "JPEG"), ("b.gif", "photo_001.gif", "GIF"), ("c.png", "photo_002.png", "PNG")]
    assert photo_notes(staged, None) == ["b.gif: 3 frames (an animation or pages): only the first is used"]


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """A 210 MP JPEG (15000 x 14000, one colour: 210 MB to build, 2 MB on disk), as a 200 MP phone writes."""
    path = tmp_path_factory.mktemp("huge") / "photos" / "big.jpg"
    path.parent.mkdir()
    Image.new("L", (15000, 14000), 128).save(path, quality=90)
    return path


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The size of every image at the moment its pixels are decoded."""
    sizes, load = [], ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


def test_a_200_megapixel_jpeg_is_downscaled_with_a_note_when_training(huge_jpeg, decoded_sizes):
    scan = scan_photos(huge_jpeg.parent, "a photo of sks dog")
    assert [(r.path.name, r.size) for r in scan.records] == [("big.jpg", (7500, 7000))]
    assert "note big.jpg: 15000x14000 (210 MP) is downscaled on load to 7500x7000" in "\n".join(scan.report(512))
    image = load_rgb(huge_jpeg)
    assert image.size == (7500, 7000) and image.getpixel((100, 100)) == (128, 128, 128)
    # Decoded straight at half scale (libjpeg's DCT scaling): 52 MP in memory, never the full 210 MP.
    assert decoded_sizes and set(decoded_sizes) == {(7500, 7000)}


def test_the_app_downscales_the_same_photo_with_the_same_note(huge_jpeg, tmp_path):
    info = check_image(huge_jpeg)
    assert (info.stored_size, info.size, info.downscaled) == ((15000, 14000), (7500, 7000), True)
    staged = stage_uploads([huge_jpeg], tmp_path / "staged").photos
    assert staged[0][1].path.read_bytes() == huge_jpeg.read_bytes()  # the original is kept; loading downscales
    notes = photo_notes(staged, 512)
    assert notes == ["big.jpg: 15000x14000 (210 MP) is downscaled on load to 7500x7000 (over 64 MP); a smaller "
                     "copy would spare that work at every load"]


def test_a_large_png_is_halved_until_within_the_working_size(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("L", (9000, 8000), 90).save(path)  # 72 MP: over 64 MP, no JPEG shortcut
    info = inspect_photo(path)
    assert (info.size, info.downscaled) == ((4500, 4000), True)
    assert load_rgb(path).getpixel((0, 0)) == (90, 90, 90)


def test_a_picture_over_the_hard_limit_is_refused_from_its_header_with_the_reason(tmp_path):
    folder = tmp_path / "photos"
    _save(folder / "ok.png")
    _png_header(folder / "bomb.png", 40_000, 30_000)
    scan = scan_photos(folder, "a photo of sks dog")
    assert [r.path.name for r in scan.records] == ["ok.png"]
    assert [s.reason for s in scan.skipped] == ["40000x30000 (1200 MP) is over the 1000 MP limit; resize it below "
                                                "that first"]
    (folder / "ok.png").unlink()
    with pytest.raises(DatasetError, match=r"no readable photo in .*bomb.png: 40000x30000 \(1200 MP\) is over"):
        scan_photos(folder, "a photo of sks dog")
    with pytest.raises(ImageError, match="over the 1000 MP limit"):
        load_rgb(folder / "bomb.png")


@pytest.mark.parametrize(("size", "resolution", "warned"), [
    ((1, 1), None, True), ((40, 300), None, True), ((64, 64), None, False),
    ((200, 300), 512, True), ((300, 300), 512, False), ((300, 300), 1024, True),
    ((48, 48), 32, False), ((60, 60), 48, False), ((40, 40), 48, True)])  # 48 for 32 px: downscaled, no note
def test_a_tiny_photo_gets_a_warning(tmp_path, size, resolution, warned):
    info = inspect_photo(_save(tmp_path / "p.png", size=size))
    notes = info.notes(resolution)
    assert bool(notes) is warned
    if warned:
        assert notes == [f"{size[0]}x{size[1]} is very small" + (f" for {resolution} px training" if resolution
                                                                  else "")
                         + ": it is upscaled, so the model learns a blurry subject"]


def test_the_run_prints_the_photos_and_class_images_it_uses(tiny_sd15_dir, mixed_folder, tmp_path, capsys):
    classes = tmp_path / "class"
    _save(classes / "dog1.jfif", GREEN, format="JPEG")  # the user's own class photos, one named .jfif
    _animated_gif(classes / "dog2.gif")
    (classes / "readme.md").write_text("class photos")
    config = tiny_config(tiny_sd15_dir, mixed_folder, tmp_path / "out", max_train_steps=1,
                         with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=str(classes),
                         num_class_images=2)
    with pytest.warns(UserWarning, match="readme.md: not an image"):
        result = run_training(config)
    out = capsys.readouterr().out
    assert f"Photos: 4 used from {mixed_folder}, 1 masks (<name>_mask files: used only with --masked_loss), 1 files " \
           "skipped" in out
    assert "c_mask.png" not in out and "skipped notes.md: not an image Pillow can read" in out
    assert f"Class images: 2 used from {classes}" in out
    assert result.steps == 1 and sorted(p.name for p in classes.iterdir()) == ["dog1.jfif", "dog2.gif", "readme.md"]


def test_a_gif_photo_leaves_no_file_open(tmp_path):
    """An animated GIF keeps its file open for seeking: what we return must not hold it."""
    import gc
    import os
    import warnings

    from moslora_diffusion.data.images import inspect_photo, load_rgb, open_oriented

    path = _animated_gif(tmp_path / "anim.gif")

    def open_handles() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in os.listdir("/proc/self/fd"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = open_oriented(path)
        assert open_handles() == 0 and image.size == (64, 64)
        info, rgb = inspect_photo(path), load_rgb(path)
        assert info.frames == 3 and rgb.getpixel((0, 0)) == GREEN
        del image, info, rgb
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
