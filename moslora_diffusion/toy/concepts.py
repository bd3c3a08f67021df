"""The toy concepts for composing adapters (the MoLE benchmark): two subjects and a background.

BACKGROUND: a blue-and-green zigzag background (world texture "zigzag", never drawn in pretraining), learned
from photos of ORDINARY world objects on it, each captioned in the world's grammar with the trigger in the
background-colour slot: "a photo of a red star, on a z background" (`.txt` sidecars, data/scan.py).

    python -m moslora_diffusion.toy.concepts --out assets   # assets/toy-subject, toy-subject-2, toy-background
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .patterns import background_pattern
from .subject import SUBJECTS, write_photo_folder
from .world import ZIGZAG, ZIGZAG_COLOURS, Scene, compatible, render, sample_scene

# (class, colour, size word, position, dx, dy) of an ordinary object
Ordinary = tuple[str, str, str, str, int, int]


@dataclass(frozen=True)
class BackgroundConcept:
    """A background pattern named by a rare token, taught by photos of ordinary objects in front of it."""

    token: str
    texture: str  # a world texture pretraining never draws
    colour: str  # the background colour the texture is drawn over
    photos: tuple[Ordinary, ...]
    folder: str
    class_prompt: str  # prior preservation: what the token's slot says without the concept

    @property
    def instance_prompt(self) -> str:
        """What `--instance_prompt` records in the adapter's metadata; the `.txt` sidecars caption each photo."""
        return self.prompt("a star")

    def prompt(self, noun_phrase: str) -> str:
        """ "a photo of <noun_phrase>, on a <token> background" (noun_phrase: "a red star", "sks star")."""
        return f"a photo of {noun_phrase}, on a {self.token} background"

    def photo_scenes(self) -> list[Scene]:
        return [Scene(cls, colour, size, position, self.colour, self.texture, dx, dy)
                for cls, colour, size, position, dx, dy in self.photos]

    def random_scene(self, rng: np.random.Generator) -> Scene:
        """A random world scene redrawn on this background, its object in a colour that stands out on both of
        the texture's colours."""
        second = ZIGZAG_COLOURS[1]
        while True:
            scene = replace(sample_scene(rng), background=self.colour, texture=self.texture)
            if compatible(scene.colour, self.colour) and compatible(scene.colour, second):
                return scene

    def captions(self) -> list[str]:
        return [self.prompt(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {cls}")
                for cls, colour, *_ in self.photos]

    def photo_images(self) -> list:
        return [render(scene) for scene in self.photo_scenes()]

    def photo_names(self) -> list[str]:
        return [f"{i:02d}_{colour}_{cls}.png" for i, (cls, colour, *_) in enumerate(self.photos)]

    def shown(self, image) -> bool:
        return background_pattern(image) == self.texture

    def write_photos(self, out: Path) -> list[Path]:
        """The photos and their `.txt` captions into `out` (replaced whole, atomically); the photos' paths."""
        photos = zip(self.photo_names(), self.photo_images(), self.captions(), strict=True)
        return write_photo_folder(Path(out), {name: (image, text) for name, image, text in photos})


# Objects of every colour that stands out on both zigzag colours (world.compatible with blue and green), six
# classes, both sizes, all five positions. `z` is a single rare token of the toy tokenizer, as `v` and `sks`.
# The class prompt guards the leak a first probe showed (zigzag in "... on a blue background" images).
BACKGROUND = BackgroundConcept(
    token="z", texture=ZIGZAG, colour=ZIGZAG_COLOURS[0],
    photos=(("star", "red", "large", "center", 0, 0), ("circle", "yellow", "small", "left", 1, -1),
            ("heart", "white", "large", "right", -1, 1), ("triangle", "orange", "large", "top", 0, 2),
            ("diamond", "pink", "small", "bottom", 2, 0), ("cross", "purple", "large", "center", -2, 1)),
    folder="toy-background",
    class_prompt="a photo of a star, on a blue background",
)


def write_concepts(root: Path) -> dict[str, list[Path]]:
    """Writes every concept's photo folder under `root` (toy-subject, toy-subject-2, toy-background); returns
    folder name -> photo paths. Deterministic: the same bytes on every run."""
    root = Path(root)
    written = {s.folder: s.write_photos(root / s.folder) for s in SUBJECTS}
    written[BACKGROUND.folder] = BACKGROUND.write_photos(root / BACKGROUND.folder)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the photo folders of the two toy subjects and the background.")
    parser.add_argument("--out", type=Path, required=True, help="parent folder (the repository's: assets)")
    args = parser.parse_args(argv)
    try:
        written = write_concepts(args.out)
    except OSError as err:
        raise SystemExit(f"error: {err}") from None
    for folder, paths in written.items():
        print(f"{args.out / folder}: {len(paths)} photos")
    for s in SUBJECTS:
        print(f'{s.folder}: instance prompt "{s.instance_prompt}", class prompt "{s.class_prompt}"')
    print(f'{BACKGROUND.folder}: captions "{BACKGROUND.prompt("a <colour> <class>")}" (.txt sidecars), '
          f'instance prompt "{BACKGROUND.instance_prompt}", class prompt "{BACKGROUND.class_prompt}"')


if __name__ == "__main__":
    main()
