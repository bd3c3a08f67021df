"""Two-object scenes of the toy world: two shapes side by side (left/right) or stacked (top/bottom).

    pair = sample_pair(np.random.default_rng(0))
    render_pair(pair)       # 64x64 PIL image
    pair_caption(pair)      # "a photo of a red star on the left and a blue circle on the right, on a green background"
    pair_caption(pair, rng) # colours and the background left out at random, the two objects named in either order

Each object is a world `Scene` (world.py) at the position its caption names, pushed 2 px further out than a
one-object scene's anchor and drawn 18-26 px wide (no size word), so the two boxes never touch (>= 2 px
apart with the +-1 px jitter) and stay off the 2 px border the checker reads the background from. Both
share the pair's background. "and" is not one token of the toy tokenizer: it is the sequence "a n d</w>",
which no one-object caption contains (rare_words.py keeps those tokens out of the rare pool).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .world import (
    BACKGROUND_COLOURS,
    CLASSES,
    OBJECT_COLOURS,
    POSITIONS,
    TEXTURES,
    Scene,
    background_phrase,
    caption,
    compatible,
    is_held_out,
    render,
    render_objects,
)

AXES = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
OUTWARD = 2  # px: each object's anchor pushed away from the centre, beyond the one-object anchor
PAIR_SIDES = (18, 26)  # box side range in px (inclusive)
PAIR_JITTER = 1
PAIR_WORDS = ("and",)  # words a two-object caption adds to the world's vocabulary


@dataclass(frozen=True)
class Pair:
    """Two objects on one background; `first` is the left (horizontal) or top (vertical) one."""

    first: Scene
    second: Scene
    background: str
    texture: str

    @property
    def axis(self) -> str:
        return "horizontal" if self.first.position == "left" else "vertical"

    @property
    def objects(self) -> tuple[Scene, Scene]:
        return self.first, self.second


def place(cls: str, colour: str, position: str, side: int, background: str, texture: str = "plain", jitter=(0, 0),
          fill=None) -> Scene:
    """An object of a two-object scene at `position` (left, right, top or bottom), `side` px wide."""
    (ax, ay), _ = POSITIONS[position]
    ox = OUTWARD * int(np.sign(ax - 32)) + jitter[0]
    oy = OUTWARD * int(np.sign(ay - 32)) + jitter[1]
    size = "large" if side >= 24 else "small"
    return Scene(cls, colour, size, position, background, texture, ox, oy, side, fill)


def make_pair(first: Scene, second: Scene) -> Pair:
    """A Pair of two placed objects (either order); raises ValueError unless they take the two places of one axis."""
    ordered = sorted((first, second), key=lambda s: ("left", "top", "right", "bottom").index(s.position))
    if tuple(s.position for s in ordered) not in AXES.values():
        raise ValueError(f"a pair needs left+right or top+bottom, got {first.position}+{second.position}")
    return Pair(ordered[0], ordered[1], first.background, first.texture)


def sample_pair(rng: np.random.Generator, split: str = "all") -> Pair:
    """A random two-object scene; split "train" excludes a pair in which either object's (class, colour,
    background) is held out (world.is_held_out), "heldout" draws only pairs with one."""
    while True:
        background = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
        texture = tuple(TEXTURES)[rng.integers(len(TEXTURES))]
        places = AXES[tuple(AXES)[rng.integers(len(AXES))]]
        objects = []
        for position in places:
            colour = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
            cls = CLASSES[rng.integers(len(CLASSES))]
            side = int(rng.integers(PAIR_SIDES[0], PAIR_SIDES[1] + 1))
            jitter = tuple(int(v) for v in rng.integers(-PAIR_JITTER, PAIR_JITTER + 1, 2))
            objects.append(place(cls, colour, position, side, background, texture, jitter))
        if not all(compatible(o.colour, background) for o in objects):
            continue
        held = any(is_held_out(o) for o in objects)
        if split == "all" or (split == "heldout") == held:
            return Pair(objects[0], objects[1], background, texture)


def render_pair(pair: Pair):
    """The pair as a 64x64 RGB PIL image (antialiased like world.render)."""
    return render_objects(pair.background, pair.texture, pair.objects)


def object_phrase(scene: Scene, with_colour: bool = True) -> str:
    """ "a red star on the left" (an unfilled object), or "sks star on the left" for a subject's noun."""
    noun = f"{scene.colour} {scene.cls}" if with_colour else scene.cls
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun} {POSITIONS[scene.position][1]}"


def pair_caption(pair: Pair, rng: np.random.Generator | None = None, omit: float = 0.3) -> str:
    """The pair's caption; with `rng`, each colour is left out with probability `omit` / 2, the background
    phrase with `omit` (its texture word as in world.caption), and the objects are named in random order.
    Positions are always named: they say which object is which."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() >= p

    objects = list(pair.objects)
    if rng is not None and rng.random() < 0.5:
        objects.reverse()
    phrases = [object_phrase(o, keep(omit / 2)) for o in objects]
    text = f"a photo of {phrases[0]} and {phrases[1]}"
    if keep(omit):
        text += background_phrase(pair.background, pair.texture, keep, omit)
    return text


def is_pair(scene) -> bool:
    return isinstance(scene, Pair)


def render_any(scene):
    """world.render for a one-object Scene, render_pair for a Pair (a pretraining set mixes both)."""
    return render_pair(scene) if is_pair(scene) else render(scene)


def caption_any(scene, rng: np.random.Generator | None = None) -> str:
    """world.caption for a one-object Scene, pair_caption for a Pair."""
    return pair_caption(scene, rng) if is_pair(scene) else caption(scene, rng)


def with_fills(pair: Pair, first=None, second=None) -> Pair:
    """The pair with patterned fills (world.Fill) on its objects, e.g. two toy subjects."""
    return replace(pair, first=replace(pair.first, fill=first), second=replace(pair.second, fill=second))
