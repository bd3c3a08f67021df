"""The quality benchmark's prompts and their fair split: validation scenes (used to choose settings and recipes)
and test scenes (reported, never used to choose), disjoint and fixed.

A scene is what an instance prompt adds to "a photo of sks star": a (position, background) pair that none of the
subject's photos shows, or only a background, or only a position. The split is a checkerboard over the grid of
(position index in world.POSITIONS, background index in subject.SUBJECT_BACKGROUNDS): a full pair goes to
validation when the two indices sum to an even number, to test when odd; background-only scenes alternate by
background index (even: validation), position-only scenes by position index. No scene is in both splits, no
randomness is involved (the same lists on every machine), and each split still names every background and
every position, so neither split is easier by construction. Class prompts with scenes use the same scenes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

SPLITS = ("validation", "test")
# Generation seed per split: the bare prompts (no scene) are drawn with other noise in each split, so the test
# images are fresh draws and no test number is a validation number seen before.
SPLIT_GEN_SEEDS = {"validation": 1234, "test": 4321}


@dataclass(frozen=True)
class InstancePrompt:
    prompt: str
    position: str | None  # None: the prompt names no position (not scored)
    background: str | None  # None: the prompt names no background (not scored)


def _split_of(*indices: int) -> str:
    return SPLITS[sum(indices) % 2]


def split_scenes(split: str | None) -> tuple[list[tuple[str, str]], list[tuple[str | None, str | None]]]:
    """(full (position, background) pairs no photo shows, partial scenes) of `split` ("validation", "test"; None:
    both, in the order the benchmark used before the split). Raises ValueError for another split name."""
    from moslora_diffusion.toy.subject import PHOTOS, SUBJECT_BACKGROUNDS
    from moslora_diffusion.toy.world import POSITIONS

    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    positions, seen = list(POSITIONS), {(photo[0], photo[2]) for photo in PHOTOS}
    pairs = [(pos, bg) for (b, bg), (p, pos) in itertools.product(enumerate(SUBJECT_BACKGROUNDS), enumerate(positions))
             if (pos, bg) not in seen and split in (None, _split_of(p, b))]
    pairs = pairs[::2] + pairs[1::2]  # a short list still varies both
    backgrounds = [(None, bg) for b, bg in enumerate(SUBJECT_BACKGROUNDS) if split in (None, _split_of(b))]
    places = [(pos, None) for p, pos in enumerate(positions) if split in (None, _split_of(p))]
    partial = [x for pair in itertools.zip_longest(backgrounds, places) for x in pair if x]
    return pairs, partial


def instance_prompts(n: int, split: str | None = None) -> list[InstancePrompt]:
    """`n` prompts that put the subject in scenes of `split` (see `split_scenes`), in the world's caption grammar.

    Two of every three name a (position, background) pair that no photo has ("a photo of sks star on the left,
    on a gray background"); the third names only a background or only a position ("a photo of sks star, on a
    green background", "a photo of sks star at the top"). Backgrounds are those the subject stands out on.
    """
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT
    from moslora_diffusion.toy.world import POSITIONS

    pairs, partial = split_scenes(split)
    chosen, full_i, partial_i = [], 0, 0
    for i in range(n):
        if i % 3 == 2:
            chosen.append(partial[partial_i % len(partial)])
            partial_i += 1
        else:
            chosen.append(pairs[full_i % len(pairs)])
            full_i += 1
    prompts = []
    for pos, bg in chosen:
        text = INSTANCE_PROMPT + (f" {POSITIONS[pos][1]}" if pos else "") + (f", on a {bg} background" if bg else "")
        prompts.append(InstancePrompt(text, pos, bg))
    return prompts


def class_prompts(n: int, split: str | None = None) -> list[str]:
    """The class prompt as is, `n` times, then `n` class prompts with the scenes of `split`'s instance prompts ("a
    photo of a star on the left, on a gray background"): a subject that leaks into the class shows in either."""
    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT

    scenes = [p.prompt.replace(INSTANCE_PROMPT, CLASS_PROMPT) for p in instance_prompts(n, split)]
    return [CLASS_PROMPT] * n + scenes
