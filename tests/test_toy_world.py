"""The toy world: deterministic renders, captions that say what is drawn, every attribute drawable."""

from __future__ import annotations

import numpy as np
import pytest

from moslora_diffusion.toy.world import (
    BACKGROUND_COLOURS,
    CLASSES,
    COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    SIZES,
    TEXTURES,
    Scene,
    caption,
    compatible,
    is_held_out,
    render,
    sample_scene,
    vocabulary,
)


def test_same_seed_same_image_bytes():
    a = [render(sample_scene(np.random.default_rng(7))).tobytes() for _ in range(2)]
    assert a[0] == a[1]
    b = render(sample_scene(np.random.default_rng(8))).tobytes()
    assert a[0] != b


def test_full_caption_mentions_every_attribute():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        text = caption(scene)
        for word in (scene.cls, scene.colour, scene.size, POSITIONS[scene.position][1], scene.background):
            assert word in text
        if scene.texture != "plain":
            assert TEXTURES[scene.texture] in text


def test_random_captions_omit_but_never_lie():
    rng = np.random.default_rng(1)
    words = set()
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        assert text.startswith("a photo of ") and scene.cls in text
        words.update(text.replace(",", " ").split())
        others = [c for c in OBJECT_COLOURS if c not in (scene.colour, scene.background)]
        assert not any(f" {c} " in f" {text} " for c in others)
    assert words <= set(vocabulary())
    star = Scene("star", "red", "small", "left", "blue", "plain")
    assert "a photo of a star" in {caption(star, np.random.default_rng(s), omit=0.99) for s in range(20)}


@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_renders_its_colour_at_every_position(cls):
    for position in POSITIONS:
        image = np.asarray(render(Scene(cls, "red", "large", position, "blue", "plain")), dtype=float)
        assert image.shape == (64, 64, 3)
        (cx, cy), _ = POSITIONS[position]
        red = np.linalg.norm(image - COLOURS["red"], axis=-1) < 30
        ys, xs = np.nonzero(red)
        assert red.sum() > 100
        assert abs((xs.min() + xs.max()) / 2 - cx) <= 2 and abs((ys.min() + ys.max()) / 2 - cy) <= 2


def test_every_colour_size_and_texture_renders():
    for colour in OBJECT_COLOURS:
        for background in BACKGROUND_COLOURS:
            if not compatible(colour, background):
                continue
            image = np.asarray(render(Scene("square", colour, "small", "center", background, "plain")), dtype=float)
            assert np.allclose(image[32, 32], COLOURS[colour], atol=1) and np.allclose(image[0, 0], COLOURS[background])
    areas = [(np.asarray(render(Scene("square", "red", s, "center", "blue", "plain")))[..., 2] < 100).sum()
             for s in SIZES]
    assert areas == [SIZES[s] ** 2 for s in SIZES]
    colours = {t: np.asarray(render(Scene("circle", "red", "small", "center", "green", t))).reshape(-1, 3)
               for t in TEXTURES}
    textures = {t: len(np.unique(c, axis=0)) for t, c in colours.items()}
    assert textures["plain"] < min(textures[t] for t in TEXTURES if t != "plain")


def test_held_out_split_is_disjoint_and_nonempty():
    rng = np.random.default_rng(3)
    assert all(not is_held_out(sample_scene(rng, "train")) for _ in range(200))
    assert all(is_held_out(sample_scene(rng, "heldout")) for _ in range(50))


def test_concept_texture_and_checker_fill_render_and_never_appear_in_pretraining():
    from moslora_diffusion.toy.world import ZIGZAG, ZIGZAG_COLOURS, Fill

    image = np.asarray(render(Scene("star", "red", "small", "center", "blue", ZIGZAG)), dtype=float)
    blue, green = (np.linalg.norm(image - COLOURS[c], axis=-1) < 30 for c in ZIGZAG_COLOURS)
    assert 0.35 < blue.mean() < 0.5 and 0.35 < green.mean() < 0.5  # the star and antialiased edges take the rest
    # zigzag, not straight bands: along a row the colour changes (a band edge rises and falls across it)
    assert blue[2].any() and green[2].any() and blue[6].any() and green[6].any()

    fill = Fill(stripes=(COLOURS["red"], COLOURS["white"]), period=1 / 3, kind="checker")
    square = np.asarray(render(Scene("square", "red", "large", "center", "blue", "plain", size_px=30, fill=fill)))
    cells = [[square[17 + 5 + 10 * r, 17 + 5 + 10 * c] for c in range(3)] for r in range(3)]  # cell centres
    for r in range(3):
        for c in range(3):
            expected = COLOURS["white"] if (r + c) % 2 else COLOURS["red"]
            assert np.allclose(cells[r][c], expected, atol=1), (r, c)

    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng) for _ in range(500)]
    assert all(s.texture != ZIGZAG and s.fill is None for s in scenes)
    assert ZIGZAG not in vocabulary() and ZIGZAG not in TEXTURES
