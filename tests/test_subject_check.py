"""subject_check: per-prompt share of generated images that show the toy subject, read from saved PNGs."""

from __future__ import annotations

import json

import pytest

from moslora_diffusion.generation.text_to_image import GeneratedImage, GenerationRequest, format_infotext, save_png
from moslora_diffusion.toy import subject_check
from moslora_diffusion.toy.subject import subject_photos, subject_scene
from moslora_diffusion.toy.world import Scene, render


def save(folder, image, prompt: str, seed: int, scale: float) -> None:
    req = GenerationRequest(prompt=prompt, seed=seed, width=64, height=64)
    text = format_infotext(req, seed, {"demo": scale}, "toy-base")
    save_png(GeneratedImage(image, text, "adapted" if scale else "base", seed), folder)


def test_counts_the_subject_per_prompt_and_model(tmp_path):
    photos = subject_photos()
    plain = [render(Scene("star", colour, "large", "center", "blue", "plain")) for colour in ("red", "green", "pink")]
    instance, cls = "a photo of sks star", "a photo of a star"
    for seed, photo in enumerate(photos[:4]):  # adapted instance prompt: the subject 4 of 5 times
        save(tmp_path, photo, instance, seed, 1.0)
    save(tmp_path, plain[0], instance, 4, 1.0)
    for seed, star in enumerate(plain):  # base and adapted class prompt: plain stars of 3 colours
        save(tmp_path, star, cls, seed, 0.0)
        save(tmp_path, star, cls, seed, 1.0)
    save(tmp_path, render(subject_scene()), cls, 3, 1.0)  # one leak
    scene = "a photo of sks star, on a blue background"
    save(tmp_path, photos[0], scene, 0, 1.0)  # the subject on blue
    save(tmp_path, photos[1], scene, 1, 1.0)  # the subject on green
    photos[0].save(tmp_path / "a-photo-of-mine.png")  # no `parameters` text: not a generated image, ignored
    from PIL.PngImagePlugin import PngInfo

    foreign = PngInfo()
    foreign.add_text("parameters", "a prompt\nSteps: 20")  # another tool's text, without size or seed
    photos[0].save(tmp_path / "from-elsewhere.png", pnginfo=foreign)  # skipped with a warning

    rows = {(r["prompt"], r["model"]): r for r in subject_check.main([str(tmp_path)])}
    assert rows[(instance, "adapted")]["subject_share"] == pytest.approx(0.8)
    assert rows[(instance, "adapted")]["instance_prompt"] is True
    assert rows[(cls, "base")]["subject_share"] == 0.0
    assert rows[(cls, "base")]["distinct_colour_background"] == 3
    assert rows[(cls, "adapted")]["subject_share"] == pytest.approx(0.25)
    saved = json.loads((tmp_path / "subject_check.json").read_text())
    assert rows[(scene, "adapted")]["background_as_prompted"] == pytest.approx(0.5)
    assert rows[(instance, "adapted")]["background_as_prompted"] is None
    assert len(saved) == 4


def test_a_folder_without_generated_images_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no generated PNGs"):
        subject_check.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder"):
        subject_check.main([str(tmp_path / "missing")])
