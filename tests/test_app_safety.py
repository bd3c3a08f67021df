"""What the app reads: only the folders it was given, adapters only as safetensors, uploads checked by content."""

import os
import struct
import zlib

import pytest
from PIL import Image

from moslora_diffusion.app.paths import AllowedRoots, PathNotAllowedError, adapter_file, discover_adapters
from moslora_diffusion.app.uploads import UploadError, check_image, check_photo_folder, photo_folders, stage_uploads


@pytest.fixture
def layout(tmp_path):
    """given/run1/moslora.safetensors (allowed), secret/moslora.safetensors (not), a link out of `given`."""
    given, secret = tmp_path / "given", tmp_path / "secret"
    for folder in (given / "run1", given / "run2", secret):
        folder.mkdir(parents=True)
        (folder / "moslora.safetensors").write_bytes(b"x")
    (given / "weights.ckpt").write_bytes(b"pickle")
    os.symlink(secret, given / "escape")
    roots = AllowedRoots()
    roots.add(given)
    return roots, given, secret


def test_paths_inside_the_given_folders_are_accepted(layout):
    roots, given, _ = layout
    assert adapter_file(given / "run1", roots) == (given / "run1" / "moslora.safetensors").resolve()
    assert adapter_file(str(given / "run2" / "moslora.safetensors"), roots).parent.name == "run2"
    assert set(discover_adapters(roots)) == {"run1", "run2"}  # the link out of the root is not listed


@pytest.mark.parametrize("relative", ["run1/../../secret", "run1/../../secret/moslora.safetensors", "escape",
                                      "escape/moslora.safetensors", "/etc/passwd"])
def test_traversal_and_links_out_of_the_folders_are_refused(layout, relative):
    roots, given, _ = layout
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        adapter_file(given / relative, roots)


def test_only_safetensors_adapters_are_read(layout):
    roots, given, _ = layout
    with pytest.raises(PathNotAllowedError, match=r"only .safetensors files are accepted; pickle files \(.ckpt\)"):
        adapter_file(given / "weights.ckpt", roots)
    (given / "notes.txt").write_text("not weights")
    with pytest.raises(PathNotAllowedError, match="only as .safetensors"):
        adapter_file(given / "notes.txt", roots)
    with pytest.raises(PathNotAllowedError, match="no adapter file"):
        adapter_file(given / "missing.safetensors", roots)


def test_a_single_file_root_allows_that_file_only(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"x")
    roots = AllowedRoots()
    roots.add(tmp_path / "a.safetensors")
    assert adapter_file(tmp_path / "a.safetensors", roots).name == "a.safetensors"
    with pytest.raises(PathNotAllowedError):
        adapter_file(tmp_path / "b.safetensors", roots)
    assert list(discover_adapters(roots)) == ["a"]


def _photo(path, size=(40, 30), fmt="PNG"):
    Image.new("RGB", size, (200, 100, 50)).save(path, format=fmt)
    return path


def _png_header(path, width, height):
    """A PNG whose header claims width x height (1-bit grey) with no pixel data: what a decompression bomb shows."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_uploads_are_checked_by_content_size_and_pixels(tmp_path):
    assert check_image(_photo(tmp_path / "ok.png")).format == "PNG"
    assert check_image(_photo(tmp_path / "named.txt", fmt="JPEG")).format == "JPEG"  # content decides, not the name
    (tmp_path / "fake.png").write_text("<script>alert(1)</script>")
    with pytest.raises(UploadError, match="fake.png: not an image Pillow can read"):
        check_image(tmp_path / "fake.png")
    full = (tmp_path / "ok.jpg")
    _photo(full, (64, 64), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:300])
    with pytest.raises(UploadError, match="cut.jpg: damaged or truncated"):
        check_image(tmp_path / "cut.jpg")
    with pytest.raises(UploadError, match="over the 0 MiB limit"):
        check_image(tmp_path / "ok.png", max_bytes=10)
    # A small file can claim a huge canvas: refused from its header, before any pixel is decoded.
    _png_header(tmp_path / "bomb.png", 40_000, 30_000)
    with pytest.raises(UploadError, match=r"bomb.png: 40000x30000 \(1200 MP\) is over the 1000 MP limit"):
        check_image(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "still.gif")
    assert check_image(tmp_path / "still.gif").format == "GIF"  # a GIF is used (its first frame), as in training
    Image.new("RGB", (8, 8)).save(tmp_path / "scan.png", format="PPM")  # decodable, but no photo format of ours
    with pytest.raises(UploadError, match="scan.png: PPM images are not used as photos; save it as JPEG or PNG"):
        check_image(tmp_path / "scan.png")


def test_staging_is_all_or_nothing_with_our_own_names(tmp_path):
    good = [_photo(tmp_path / "a.png"), _photo(tmp_path / "b.jpeg", fmt="JPEG"),
            _photo(tmp_path / "c.jfif", fmt="JPEG")]
    (tmp_path / "notes.png").write_text("not an image")
    dest = tmp_path / "staged"
    with pytest.raises(UploadError, match="notes.png"):
        stage_uploads(good + [tmp_path / "notes.png"], dest)
    assert not dest.exists()
    written = stage_uploads(good, dest).photos
    assert [(name, info.path.name) for name, info in written] == [
        ("a.png", "photo_000.png"), ("b.jpeg", "photo_001.jpg"), ("c.jfif", "photo_002.jpg")]
    assert all(info.path.read_bytes() == src.read_bytes() for src, (_, info) in zip(good, written, strict=True))
    with pytest.raises(UploadError, match="at least one photo"):
        stage_uploads([], dest)


def test_photo_folders_come_only_from_the_given_roots(tmp_path):
    photos = tmp_path / "photos"
    (photos / "dog").mkdir(parents=True)
    (photos / "empty").mkdir()
    _photo(photos / "dog" / "1.png")
    roots = AllowedRoots()
    roots.add(photos)
    assert photo_folders(roots) == {"photos/dog": photos / "dog"}
    folder, found = check_photo_folder(photos / "dog", roots)
    assert folder == (photos / "dog").resolve() and [p.path.name for p in found.photos] == ["1.png"]
    with pytest.raises(UploadError, match="no usable photos"):
        check_photo_folder(photos / "empty", roots)
    with pytest.raises(PathNotAllowedError):
        check_photo_folder(photos / ".." / "..", roots)
