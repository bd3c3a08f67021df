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


def test_reports_the_second_subject_the_zigzag_and_bleed(tmp_path):
    from moslora_diffusion.toy.concepts import BACKGROUND
    from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2
    from moslora_diffusion.toy.world import with_fill

    squares, stars = SUBJECT_2.photo_images(), subject_photos()
    v_prompt, composed = SUBJECT_2.instance_prompt, BACKGROUND.prompt(SUBJECT.token + " star")
    for seed, square in enumerate(squares[:3]):  # the second subject 3 of 4 times, once with the stripes (bleed)
        save(tmp_path, square, v_prompt, seed, 1.0)
    save(tmp_path, render(with_fill(SUBJECT_2.scene(), SUBJECT.fill)), v_prompt, 3, 1.0)
    on_zigzag = render(SUBJECT.scene(background=BACKGROUND.colour, texture=BACKGROUND.texture))
    save(tmp_path, on_zigzag, composed, 0, 1.0)  # both present
    save(tmp_path, stars[0], composed, 1, 1.0)  # the subject on plain blue: no zigzag
    leak = "a photo of a red star, on a blue background"
    save(tmp_path, BACKGROUND.photo_images()[0], leak, 0, 1.0)  # the zigzag where the prompt asks for blue
    save(tmp_path, render(Scene("star", "red", "large", "center", "blue", "plain")), leak, 1, 1.0)

    rows = {(r["prompt"], r["model"]): r for r in subject_check.main([str(tmp_path)])}
    v_row, both, blue = rows[(v_prompt, "adapted")], rows[(composed, "adapted")], rows[(leak, "adapted")]
    assert v_row["named"] == ["v"] and v_row["subject_2_share"] == pytest.approx(0.75)
    assert v_row["bleed_share"] == pytest.approx(0.25) and v_row["subject_share"] == pytest.approx(0.25)
    assert both["named"] == ["sks", "z"] and both["subject_share"] == 1.0 and both["zigzag_share"] == 0.5
    assert both["bleed_share"] == 0.0 and both["subject_2_share"] == 0.0
    assert blue["named"] == [] and blue["zigzag_share"] == 0.5
    assert blue["background_as_prompted"] == 1.0  # the colour reading calls the zigzag blue: only the pattern tells


def test_mole_images_are_counted_as_mole_not_base(tmp_path):
    """A PNG written by `mole generate` (MoLE pairs in its parameters text, no LoRA scales) is its own row."""
    from moslora_diffusion.generation.text_to_image import MoLESettings

    request = GenerationRequest(prompt="a photo of sks star", seed=3, steps=2, width=64, height=64,
                                mole=MoLESettings("gates", {"a": 1.0, "b": 1.0}, []))
    text = format_infotext(request, 3, {}, "toy-base", {"MoLE": "gates", "MoLE scales": "a: 1, b: 1"})
    save_png(GeneratedImage(render(subject_scene()), text, "mole", 3), tmp_path)
    rows = subject_check.main([str(tmp_path)])
    assert [(r["prompt"], r["model"], r["images"]) for r in rows] == [("a photo of sks star", "mole", 1)]
    assert rows[0]["subject_share"] == 1.0


def test_counts_the_images_that_draw_an_object_at_all_and_those_read_as_the_prompted_class(tmp_path):
    """The class-prompt loss the demo's table once hid: after training, "a photo of a star" drew an empty
    background in most images; the bleed and diversity columns cannot see that, these do."""
    from PIL import Image

    from moslora_diffusion.toy.world import COLOURS

    cls = "a photo of a star"
    stars = [render(Scene("star", colour, "large", "center", "blue", "plain")) for colour in ("red", "green")]
    empty = Image.new("RGB", (64, 64), tuple(COLOURS["blue"]))  # a background and nothing on it
    circle = render(Scene("circle", "red", "large", "center", "blue", "plain"))  # an object, of another class
    for seed, image in enumerate([*stars, stars[0], stars[1]]):
        save(tmp_path, image, cls, seed, 0.0)
    for seed, image in enumerate([stars[0], empty, empty, circle]):
        save(tmp_path, image, cls, seed, 1.0)
    for seed, photo in enumerate(subject_photos()[:2]):  # the striped subject is a star too
        save(tmp_path, photo, "a photo of sks star", seed, 1.0)
    save(tmp_path, stars[0], "a photo of something", 0, 1.0)  # names no class: no reading
    rows = {(r["prompt"], r["model"]): r for r in subject_check.main([str(tmp_path)])}
    assert (rows[(cls, "base")]["object_share"], rows[(cls, "base")]["class_read_share"]) == (1.0, 1.0)
    adapted = rows[(cls, "adapted")]  # a star, two empty backgrounds, a circle
    assert (adapted["object_share"], adapted["class_read_share"]) == (0.5, 0.25)
    assert rows[("a photo of sks star", "adapted")]["class_read_share"] == 1.0
    assert rows[("a photo of something", "adapted")]["class_read_share"] is None
    assert rows[("a photo of something", "adapted")]["object_share"] == 1.0
    assert subject_check.prompted_class("a photo of a red star, on a z background") == "star"
    assert subject_check.prompted_class("a photo of v square") == "square"
