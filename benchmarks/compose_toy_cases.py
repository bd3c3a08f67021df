"""The composition benchmark's prompts and layouts (benchmarks/compose_toy.py), split into validation and test.

Three experts, named by their trigger words: `sks` (the striped star), `v` (the checkered square) and `z` (the
zigzag background). Case kinds:

- pair: both subjects, "a photo of sks star on the left and v square on the right": left/right and top/bottom,
  the star in either place, either subject named first (8 layouts; 4 per split, both axes in each);
- zigzag: the star on the zigzag background at a named place ("a photo of sks star on the left, on a z
  background"); 2 places per split;
- one: a one-subject prompt through the two subjects' composition (both experts loaded, one named); validation
  names a place, test gives the bare instance prompts (the experts' own prompts, the "alone" ceiling).

No prompt is in both splits. Every case composes the experts it names (one: both subjects'); the spatial
methods get the named concepts' places as regions (`regions`), the zigzag the rest of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from moslora_diffusion.toy.composition_check import PLACES, Expected

SUBJECTS = {"sks": ("star", "stripes"), "v": ("square", "checker")}  # trigger -> (class noun, pattern)
BACKGROUND = "z"
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "pair" | "zigzag" | "one"
    prompt: str
    experts: tuple[str, ...]  # trigger names, in composition order
    places: tuple[tuple[str, str], ...]  # (concept, place): where each named concept belongs
    zigzag: bool = False

    @property
    def expected(self) -> Expected:
        return Expected(tuple((SUBJECTS[c][1], place) for c, place in self.places), zigzag=self.zigzag)

    @property
    def background(self) -> str | None:
        """The expert that draws the background (compose's `background`), None: the base model."""
        return BACKGROUND if self.zigzag else None

    def region_specs(self, region_prompts: bool) -> list[dict]:
        """Region(**spec) per named subject: its place's box (and, with `region_prompts`, the subject's own
        instance prompt: what is in the region, not where, which the box says). The zigzag expert takes no region:
        it is the `background` (compose's option), which draws wherever the subject's region leaves room."""
        specs = []
        for concept, place in self.places:
            noun = f"{concept} {SUBJECTS[concept][0]}"
            specs.append({"expert": concept, "box": PLACES[place],
                          "prompt": f"a photo of {noun}" if region_prompts else None})
        return specs


def _pair(star: str, first: str) -> Case:
    square = OPPOSITE[star]
    star_phrase, square_phrase = f"sks star {PHRASES[star]}", f"v square {PHRASES[square]}"
    text = f"{star_phrase} and {square_phrase}" if first == "sks" else f"{square_phrase} and {star_phrase}"
    return Case(f"pair_{star}_{first}", "pair", f"a photo of {text}", ("sks", "v"),
                (("sks", star), ("v", square)))


def _zigzag(place: str) -> Case:
    return Case(f"zigzag_{place}", "zigzag", f"a photo of sks star {PHRASES[place]}, on a z background",
                ("sks", "z"), (("sks", place),), zigzag=True)


def _one(concept: str, place: str) -> Case:
    where = "" if place == "any" else " " + PHRASES[place]
    return Case(f"one_{concept}_{place}", "one", f"a photo of {concept} {SUBJECTS[concept][0]}{where}",
                ("sks", "v"), ((concept, place),))


SPLITS: dict[str, tuple[Case, ...]] = {
    "validation": (_pair("left", "sks"), _pair("right", "v"), _pair("top", "sks"), _pair("bottom", "v"),
                   _zigzag("left"), _zigzag("top"), _one("sks", "left"), _one("v", "top")),
    "test": (_pair("left", "v"), _pair("right", "sks"), _pair("top", "v"), _pair("bottom", "sks"),
             _zigzag("right"), _zigzag("bottom"), _one("sks", "any"), _one("v", "any")),
}
KINDS = ("pair", "zigzag", "one")
