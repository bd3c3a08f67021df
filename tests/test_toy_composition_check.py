"""The per-subject measure on rendered ground truth: presence in place, identity mixing, joint success."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moslora_diffusion.toy.composition_check import Expected, measure, place_mask, rates
from moslora_diffusion.toy.concepts import BACKGROUND
from moslora_diffusion.toy.pairs import AXES, make_pair, place, render_pair
from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2
from moslora_diffusion.toy.world import ZIGZAG, render

BACKGROUNDS = tuple(b for b in SUBJECT.backgrounds if b in SUBJECT_2.backgrounds)


def _subjects(rng, first: str, second: str, fills=(SUBJECT.fill, SUBJECT_2.fill)):
    """A render of the striped star at `first` and the checkered square at `second` (fills swappable)."""
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    sides = rng.integers(18, 27, 2)
    star = place("star", "yellow", first, int(sides[0]), bg, jitter=tuple(rng.integers(-1, 2, 2)), fill=fills[0])
    square = place("square", "red", second, int(sides[1]), bg, jitter=tuple(rng.integers(-1, 2, 2)), fill=fills[1])
    return render_pair(make_pair(star, square))


def _layouts():
    for first, second in AXES.values():
        yield first, second
        yield second, first


def test_two_subjects_in_their_places_are_joint_successes_and_swapped_ones_are_mixing():
    rng = np.random.default_rng(0)
    right, swapped = [], []
    for _ in range(40):
        for first, second in _layouts():
            image = _subjects(rng, first, second)
            right.append(measure(image, Expected((("stripes", first), ("checker", second)))))
            swapped.append(measure(image, Expected((("stripes", second), ("checker", first)))))
    # 160 renders (40 per layout): every one a joint success, every swapped reading mixing
    assert rates(right) == {"present_stripes": 1.0, "present_checker": 1.0, "mixing": 0.0, "joint": 1.0}
    assert rates(swapped) == {"present_stripes": 0.0, "present_checker": 0.0, "mixing": 1.0, "joint": 0.0}


def test_a_missing_or_plain_subject_is_absent_and_a_blend_of_both_patterns_is_mixing():
    rng = np.random.default_rng(1)
    plain = _subjects(rng, "left", "right", fills=(None, SUBJECT_2.fill))  # an ordinary yellow star on the left
    verdict = measure(plain, Expected((("stripes", "left"), ("checker", "right"))))
    assert verdict.found["stripes"] and not verdict.present["stripes"] and verdict.present["checker"]
    assert not verdict.mixing and not verdict.joint
    striped = np.asarray(_subjects(np.random.default_rng(2), "left", "right"))
    checkered = np.asarray(_subjects(np.random.default_rng(2), "left", "right", fills=(SUBJECT_2.fill,) * 2))
    blend = striped.copy()
    blend[:, :16] = checkered[:, :16]  # the left object part striped, part checkered (each pattern >= 0.2)
    verdict = measure(Image.fromarray(blend), Expected((("stripes", "left"), ("checker", "right"))))
    assert verdict.present["stripes"] and verdict.mixing and not verdict.joint
    empty = np.full((64, 64, 3), 128, dtype=np.uint8)
    verdict = measure(empty, Expected((("stripes", "left"),)))
    assert verdict.found == {"stripes": False} and not verdict.joint


def test_subject_on_the_zigzag_needs_both_and_one_subject_anywhere():
    rng = np.random.default_rng(3)
    on_zigzag = [SUBJECT.random_scene(rng, background=BACKGROUND.colour, texture=ZIGZAG) for _ in range(30)]
    want = Expected((("stripes", "any"),), zigzag=True)
    assert rates([measure(render(s), want) for s in on_zigzag])["joint"] == 1.0
    on_plain = [SUBJECT.random_scene(rng) for _ in range(30)]
    result = rates([measure(render(s), want) for s in on_plain])
    assert result["present_stripes"] == 1.0 and result["zigzag"] == 0.0 and result["joint"] == 0.0
    second = [SUBJECT_2.random_scene(rng) for _ in range(30)]
    one = rates([measure(render(s), Expected((("checker", "any"),))) for s in second])
    assert one == {"present_checker": 1.0, "mixing": 0.0, "joint": 1.0}


def test_places_and_bad_expectations():
    assert place_mask("left", (64, 64))[:, :32].all() and not place_mask("left", (64, 64))[:, 32:].any()
    box = place_mask((0.25, 0.5, 0.75, 1.0), (64, 32))
    assert box.shape == (32, 64) and box.sum() == 32 * 16 and box[16:, 16:48].all()
    with pytest.raises(ValueError, match="unknown pattern 'dots'"):
        Expected((("dots", "left"),))
    with pytest.raises(ValueError, match="unknown place 'middle'"):
        Expected((("stripes", "middle"),))
    with pytest.raises(ValueError, match="no verdicts"):
        rates([])
