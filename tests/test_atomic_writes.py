"""Every write whole or not at all (files/atomic.py): generated images, exclusive names, killed writers' leftovers."""

from __future__ import annotations

import errno
import os
import time

import pytest
from PIL import Image

from moslora_diffusion.files.atomic import (
    TEMP_NAME,
    atomic_write,
    remove_stale_temporaries,
    save_new_image,
    write_folder_atomically,
)
from moslora_diffusion.generation.text_to_image import GeneratedImage, parse_infotext, save_png

DEAD_PID = 99_999_999  # above any pid_max Linux allows: no process can have it


def _item(seed: int = 7) -> GeneratedImage:
    image = Image.new("RGB", (16, 16), (seed * 20 % 256, 90, 30))
    text = f"a photo of sks dog\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: {seed}, Size: 16x16, Model: tiny"
    return GeneratedImage(image, text, "adapted", seed)


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_full_disk_leaves_no_png_behind(tmp_path, monkeypatch):
    """The app and `generate` save through save_png; a write that fails part-way leaves nothing, not a 0-byte PNG."""
    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")  # a few bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_png(_item(), tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_saved_pngs_never_overwrite_and_keep_their_parameters(tmp_path):
    first, second = save_png(_item(7), tmp_path), save_png(_item(7), tmp_path)
    assert first != second and first.parent == second.parent
    assert [p.name for p in sorted(first.parent.iterdir())] == ["00000-7-adapted.png", "00001-7-adapted.png"]
    with Image.open(second) as img:
        assert parse_infotext(img.text["parameters"]).seed == 7
    # A name taken between the listing and the rename (another saver) is skipped, never replaced.
    taken = first.parent / "00002-7-adapted.png"
    taken.write_bytes(b"someone else's file")
    names = iter(["00002-7-adapted.png", "00003-7-adapted.png"])
    written = save_new_image(_item(7).image, first.parent, names)
    assert written.name == "00003-7-adapted.png" and taken.read_bytes() == b"someone else's file"


def test_overwrite_false_refuses_an_existing_file_even_at_the_rename(tmp_path):
    target = tmp_path / "out.txt"

    def write_and_race(tmp):
        tmp.write_text("ours")
        target.write_text("theirs")  # another process creates the name while we write

    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write(target, write_and_race, overwrite=False)
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_killed_writers_temporaries_are_removed_by_the_next_write_and_nothing_else(tmp_path):
    stale_by_age = tmp_path / ".x.png.abc12345.tmp"  # no pid in the name (an older writer): age decides
    stale_by_age.write_bytes(b"half")
    _age(stale_by_age, 2 * 3600)
    dead_writer = tmp_path / f".model.safetensors.{DEAD_PID}-k2j4h6g8.tmp"  # its process is gone: a minute on
    dead_writer.write_bytes(b"half")
    _age(dead_writer, 120)
    dead_folder = tmp_path / f".export.{DEAD_PID}-0a1b2c3d.tmp"
    (dead_folder / "unet").mkdir(parents=True)
    for path in (dead_folder / "unet", dead_folder):
        _age(path, 120)
    just_orphaned = tmp_path / f".b.png.{DEAD_PID}-m3n4b5v6.tmp"  # a writer on another host may still be at it
    just_orphaned.write_bytes(b"half")
    live_writer = tmp_path / f".other.png.{os.getppid()}-q1w2e3r4.tmp"  # a running process, just written
    live_writer.write_bytes(b"being written")
    recent = tmp_path / ".y.png.def67890.tmp"
    recent.write_bytes(b"maybe still being written")
    users = {".hidden": b"mine", ".notes.tmp": b"mine too", "photo.png.tmp": b"and this", ".cache.v1.tmp": b"x"}
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
        _age(tmp_path / name, 2 * 3600)

    assert stale_by_age.exists() and dead_writer.exists()  # until something is written in this folder
    atomic_write(tmp_path / "result.txt", lambda tmp: tmp.write_text("new"))

    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"result.txt", live_writer.name, recent.name, just_orphaned.name, *users}
    assert all((tmp_path / name).read_bytes() == data for name, data in users.items())


def test_the_pattern_matches_what_the_writers_create(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.txt", lambda tmp: seen.append(tmp.name) or tmp.write_text("x"))
    write_folder_atomically(tmp_path / "folder", lambda tmp: seen.append(tmp.name), 0, overwrite=False)
    assert len(seen) == 2 and all(TEMP_NAME.match(name) for name in seen)
    assert all(f".{os.getpid()}-" in name for name in seen)
    assert remove_stale_temporaries(tmp_path) == []  # nothing left over after complete writes


def test_a_full_disk_is_refused_before_any_folder_is_made(tmp_path, monkeypatch):
    """The check comes before the folders of the new file are created: a refusal leaves no empty folder (a saved
    image goes to <out>/<date>/, both new), and the message names the margin that made it refuse."""
    import shutil
    import types

    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=2**40, used=0, free=2**21))
    item = GeneratedImage(Image.new("RGB", (8, 8)), "a photo", "adapted", 0)
    with pytest.raises(OSError, match=r"2 MiB free, and writing there needs 1 MiB plus 64 MiB kept free"):
        save_png(item, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_written_atomically_is_readable_by_others_whatever_wrote_it(tmp_path):
    """safetensors' save_file (and mkstemp) create 0600 files: a model on a shared folder would be unreadable to
    other users. Every file and folder of the published folder gets the umask's mode, like a config file."""
    import torch
    from safetensors.torch import save_file

    from moslora_diffusion.models.tiny import save_tiny_pipeline

    def write(tmp):
        (tmp / "unet").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        (tmp / "model_index.json").write_text("{}")
        (tmp / "private").write_text("x")
        os.chmod(tmp / "private", 0o600)
        os.symlink("/etc/hostname", tmp / "link")  # a link is never followed (the target keeps its mode)

    previous = os.umask(0o022)
    try:
        out = write_folder_atomically(tmp_path / "model", write, 0, overwrite=False)
        tiny = save_tiny_pipeline("sd15", tmp_path / "tiny")  # the `python -m moslora_diffusion.tiny` writer
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): p.lstat().st_mode & 0o777 for p in out.rglob("*") if not p.is_symlink()}
    assert modes == {"unet": 0o755, "unet/diffusion_pytorch_model.safetensors": 0o644, "model_index.json": 0o644,
                     "private": 0o644}
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "link").is_symlink()
    weights = sorted(tiny.rglob("*.safetensors"))
    assert weights and {p.stat().st_mode & 0o777 for p in tiny.rglob("*") if p.is_file()} == {0o644}

    previous = os.umask(0o077)  # a user who keeps their files private gets private files
    try:
        out = write_folder_atomically(tmp_path / "mine", write, 0, overwrite=False)
    finally:
        os.umask(previous)
    assert {p.lstat().st_mode & 0o777 for p in out.rglob("*") if p.is_file() and not p.is_symlink()} == {0o600}
    assert (out / "unet").stat().st_mode & 0o777 == 0o700
