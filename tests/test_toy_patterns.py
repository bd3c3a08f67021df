"""The pattern readings (toy/patterns.py) on rendered ground truth: both subjects, the zigzag background, bleed.

Rates are over random renders with fixed seeds; the figures in comments were measured on 1,000 renders each
(README, "The checker's pattern readings").
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFilter

from moslora_diffusion.toy.checker import check
from moslora_diffusion.toy.concepts import BACKGROUND
from moslora_diffusion.toy.patterns import (
    PATTERN_THRESHOLD,
    ZIGZAG_THRESHOLD,
    background_pattern,
    pattern_of,
    read_patterns,
)
from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2, SUBJECTS, is_subject, subject_score
from moslora_diffusion.toy.world import Scene, inside_frame, render, sample_scene, with_fill


def rate(predicate, items) -> float:
    return sum(map(predicate, items)) / len(items)


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.token)
def test_every_subject_render_shows_its_own_pattern_only(subject):
    rng = np.random.default_rng(11)
    images = [render(subject.random_scene(rng)) for _ in range(150)]
    # measured on 1,000: 1,000 of 1,000 for each subject (scores >= 0.72); the other pattern always 0.00
    assert rate(lambda im: pattern_of(im) == subject.pattern, images) >= 0.98
    assert rate(subject.shown, images) >= 0.98
    other = SUBJECT_2 if subject is SUBJECT else SUBJECT
    assert not any(other.shown(im) for im in images)


def test_ordinary_objects_carry_no_subject_pattern():
    rng = np.random.default_rng(12)
    scenes = [sample_scene(rng) for _ in range(300)]
    assert all(inside_frame(s) for s in scenes)
    readings = [read_patterns(render(s)) for s in scenes]
    # measured on 1,000: every score 0.00 (the largest 0.0), for either pattern and the zigzag
    assert rate(lambda r: not r.object_patterns, readings) >= 0.98
    assert max(max(r.object_scores.values()) for r in readings) < PATTERN_THRESHOLD / 2
    assert max(r.zigzag for r in readings) < ZIGZAG_THRESHOLD / 2


def test_rim_and_border_cases_that_read_as_the_subject_before():
    """A small yellow square on black scored exactly 0.2 (its antialiased rim is nearest to black) and a yellow
    cross near the edge of a black striped background made the border's 2-means treat the stripes as one
    colour, so the stripes became 'the object' (score 0.79). Neither is the subject."""
    square = render(Scene("square", "yellow", "small", "center", "black", "plain", -2, -2))
    cross = render(Scene("cross", "yellow", "large", "right", "black", "stripes", 2, -1))
    assert subject_score(square) < 0.05 and not is_subject(square)
    assert not is_subject(cross) and check(cross).cls == "cross"


def test_zigzag_is_detected_on_its_renders_and_not_on_world_backgrounds():
    rng = np.random.default_rng(13)
    on_zigzag = [render(BACKGROUND.random_scene(rng)) for _ in range(150)]
    world = [render(sample_scene(rng)) for _ in range(150)]
    # measured on 1,000: zigzag 1,000 of 1,000 (scores 0.90-0.97); world backgrounds 0 of 1,000 (0.00)
    assert rate(BACKGROUND.shown, on_zigzag) >= 0.98
    assert rate(lambda im: background_pattern(im) is None, world) >= 0.98
    assert rate(lambda im: pattern_of(im) is None, on_zigzag) >= 0.98  # the objects are ordinary


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.token)
def test_a_subject_on_the_zigzag_shows_both(subject):
    """The composition the MoLE benchmark asks for, in ground truth: subject and background both read."""
    rng = np.random.default_rng(14)
    images = [render(subject.random_scene(rng, BACKGROUND.colour, BACKGROUND.texture)) for _ in range(100)]
    # measured on 1,000: 1,000 of 1,000 for each (subject scores >= 0.73, zigzag >= 0.90)
    assert rate(lambda im: subject.shown(im) and BACKGROUND.shown(im), images) >= 0.98


def test_bleed_an_object_with_the_other_subjects_pattern_is_flagged():
    rng = np.random.default_rng(15)
    # backgrounds both patterns stand out on (a red-and-white star on red is no subject either)
    shared = [b for b in SUBJECT.backgrounds if b in SUBJECT_2.backgrounds]

    def framed(subject):
        return subject.random_scene(rng, shared[rng.integers(len(shared))])

    star_checker = [render(with_fill(framed(SUBJECT), SUBJECT_2.fill)) for _ in range(60)]
    square_stripes = [render(with_fill(framed(SUBJECT_2), SUBJECT.fill)) for _ in range(60)]
    # measured on 1,000: 1,000 of 1,000 each way
    assert rate(lambda im: pattern_of(im) == "checker" and not SUBJECT.shown(im), star_checker) >= 0.98
    assert rate(lambda im: pattern_of(im) == "stripes" and not SUBJECT_2.shown(im), square_stripes) >= 0.98
    # both patterns on one object (left half striped, right half checkered): both subjects' patterns read
    both = []
    for _ in range(60):
        scene = framed(SUBJECT)
        left, right = (np.asarray(render(with_fill(scene, s.fill))) for s in SUBJECTS)
        cx = int(round((scene.box[0] + scene.box[2]) / 2))
        both.append(np.concatenate([left[:, :cx], right[:, cx:]], axis=1))
    assert rate(lambda im: pattern_of(im) == "stripes+checker", both) >= 0.95


def test_readings_survive_blur_and_noise():
    rng = np.random.default_rng(16)

    def degrade(image):
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=float)
        return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)

    for subject in SUBJECTS:  # measured on 300: 300 of 300 each (scores >= 0.51), zigzag 300 (>= 0.89)
        assert rate(subject.shown, [degrade(render(subject.random_scene(rng))) for _ in range(60)]) >= 0.95
    assert rate(BACKGROUND.shown, [degrade(render(BACKGROUND.random_scene(rng))) for _ in range(60)]) >= 0.95
    plain = [degrade(render(sample_scene(rng))) for _ in range(60)]
    assert rate(lambda im: pattern_of(im) is None and background_pattern(im) is None, plain) >= 0.95
