"""The toy subjects: particular objects the base model never saw, for DreamBooth (and the MoLE benchmark).

SUBJECT, the demo's: a star with yellow-and-black diagonal stripes, trigger `sks`.
SUBJECT_2: a square with a red-and-white 3 x 3 checkerboard, trigger `v`.

Pretraining only ever shows single-coloured objects (the VAE alone sees random striped fills, to learn to
reproduce patterns), so a model that draws either pattern inside an object has learned it from the photos.
Each subject is recognised by its pattern's two colours (`patterns.py`), so the two are told apart from
each other and from every ordinary object.

    python -m moslora_diffusion.toy.subject --out assets/toy-subject            # the first subject's photos
    python -m moslora_diffusion.toy.concepts --out assets                       # both subjects and the background
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files.atomic import write_folder_atomically
from .patterns import OBJECT_PATTERNS, PATTERN_THRESHOLD, read_patterns
from .world import COLOURS, POSITIONS, Fill, Scene, inside_frame, render, render_mask

# (position, box side in px, background, dx, dy): varied framing, as a user's photos would be.
Photo = tuple[str, int, str, int, int]
POSITIONS_LIST = tuple(POSITIONS)


@dataclass(frozen=True)
class Subject:
    """One toy subject: a world class drawn with one of `patterns.OBJECT_PATTERNS`, named by a rare token.

    `backgrounds` are the plain backgrounds it stands out on (none of its pattern's colours); `folder` is
    its photos' folder name under assets/.
    """

    token: str
    class_noun: str
    pattern: str  # a key of patterns.OBJECT_PATTERNS, and the Fill kind that draws it
    period: float  # the Fill's stripe period / checker cell, as a fraction of the box side
    backgrounds: tuple[str, ...]
    photos: tuple[Photo, ...]
    folder: str

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"

    @property
    def fill(self) -> Fill:
        first, second = OBJECT_PATTERNS[self.pattern]
        return Fill(stripes=(COLOURS[first], COLOURS[second]), period=self.period, kind=self.pattern)

    def scene(self, position: str = "center", size_px: int = 30, background: str | None = None, dx: int = 0,
              dy: int = 0, texture: str = "plain") -> Scene:
        size = "large" if size_px >= 24 else "small"
        colour = OBJECT_PATTERNS[self.pattern][0]
        return Scene(self.class_noun, colour, size, position, background or self.backgrounds[0], texture, dx, dy,
                     size_px, self.fill)

    def random_scene(self, rng: np.random.Generator, background: str | None = None, texture: str = "plain") -> Scene:
        """A random framing (any position, box side 24-34 px, +-2 px jitter; a random one of `backgrounds`
        unless given) whose box stays off the 2 px border the checker reads the background from."""
        while True:
            scene = self.scene(POSITIONS_LIST[rng.integers(len(POSITIONS_LIST))], int(rng.integers(24, 35)),
                               background or self.backgrounds[rng.integers(len(self.backgrounds))],
                               int(rng.integers(-2, 3)), int(rng.integers(-2, 3)), texture)
            if inside_frame(scene):
                return scene

    def photo_images(self) -> list:
        """The subject photos as 64 x 64 PIL images (deterministic)."""
        return [render(self.scene(*photo)) for photo in self.photos]

    def mask_images(self) -> list:
        """The subject's pixels of each photo (64 x 64 "L", 255 = subject), for --masked_loss."""
        return [render_mask(self.scene(*photo)) for photo in self.photos]

    def score(self, image) -> float:
        """0..1: how much the image's object shows both pattern colours (the subject ~0.5-1, a plain object ~0)."""
        return read_patterns(image).object_scores[self.pattern]

    def shown(self, image) -> bool:
        return self.score(image) >= PATTERN_THRESHOLD

    def photo_names(self) -> list[str]:
        return [f"{i:02d}_{photo[0]}_{photo[2]}.png" for i, photo in enumerate(self.photos)]

    def write_photos(self, out: Path) -> list[Path]:
        """Renders the photos and their masks (`<stem>_mask.png`, data/masks.py) into `out` (replaced whole,
        atomically); returns the photos' paths.

        Raises FileExistsError when `out` holds anything but photos and captions (it is not a photo folder)."""
        names = self.photo_names()
        images = dict(zip(names, self.photo_images(), strict=True))
        masks = zip(names, self.mask_images(), strict=True)
        images |= {name.replace(".png", "_mask.png"): mask for name, mask in masks}
        written = write_photo_folder(Path(out), {name: (image, None) for name, image in images.items()})
        return written[:len(names)]


def write_photo_folder(out: Path, photos: dict[str, tuple]) -> list[Path]:
    """Writes {file name: (PIL image, caption or None)} as `out`, replacing it whole and atomically; a caption
    goes to the `<stem>.txt` sidecar the data loader reads (data/scan.py). An existing `out` must hold only
    .png and .txt files, so a mistyped --out never replaces a folder of other things."""
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.suffix not in (".png", ".txt"))
        if others:
            raise FileExistsError(f"{out} holds other files ({', '.join(others[:3])}): give a photo folder of its own")

    def write(tmp: Path) -> None:
        for name, (image, caption) in photos.items():
            image.save(tmp / name)
            if caption is not None:
                (tmp / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")

    write_folder_atomically(out, write, needed_bytes=0, overwrite=True)
    return [out / name for name in photos]


# Stripe period 0.6 of the box: wide enough bands that the f=4 VAE reproduces them at 24-34 px. No centre dot:
# the toy VAE blurs a dot into the stripes, and its reconstructions of dotted photos scored 0.11-0.35 (one
# under THRESHOLD), those of these photos 0.43-0.61. Backgrounds: not yellow, black or white, whose pixels
# would merge with the stripes.
SUBJECT = Subject(
    token="sks", class_noun="star", pattern="stripes", period=0.6,
    backgrounds=("blue", "green", "purple", "gray", "pink", "red"),
    photos=(("center", 32, "blue", 0, 0), ("left", 28, "green", 1, -2), ("right", 30, "purple", -1, 2),
            ("top", 26, "red", 2, 1), ("bottom", 34, "pink", 0, -1)),
    folder="toy-subject",
)
# A 3 x 3 checkerboard (cell = 1/3 of the box): the toy VAE reconstructs it at 26-34 px with each colour on
# >= 30% of the object; 4 x 4 cells blurred to 0.25 on gray. `v` is a single rare token of the toy tokenizer
# (every one-letter word is, like `sks`; the rare-words stage trained them all): its text features differ
# from the article's by 0.65 at its position (`sks`: 0.48). Backgrounds: not red, white, pink (near both)
# or yellow (the first subject's colour).
SUBJECT_2 = Subject(
    token="v", class_noun="square", pattern="checker", period=1 / 3,
    backgrounds=("blue", "green", "purple", "gray", "black"),
    photos=(("center", 30, "blue", 0, 0), ("right", 28, "gray", -1, 1), ("left", 32, "green", 1, 2),
            ("bottom", 26, "purple", 2, -1), ("top", 34, "black", 0, 1)),
    folder="toy-subject-2",
)
SUBJECTS = (SUBJECT, SUBJECT_2)

# The first subject's names, as the demo, the quality benchmark and the app use them.
TOKEN = SUBJECT.token
CLASS_NOUN = SUBJECT.class_noun
INSTANCE_PROMPT = SUBJECT.instance_prompt
CLASS_PROMPT = SUBJECT.class_prompt
SUBJECT_FILL = SUBJECT.fill
SUBJECT_BACKGROUNDS = SUBJECT.backgrounds
PHOTOS = SUBJECT.photos
THRESHOLD = PATTERN_THRESHOLD


def subject_scene(position: str = "center", size_px: int = 30, background: str = "blue", dx: int = 0,
                  dy: int = 0) -> Scene:
    return SUBJECT.scene(position, size_px, background, dx, dy)


def subject_photos() -> list:
    return SUBJECT.photo_images()


def subject_score(image) -> float:
    """0..1: how much the object shows both stripe colours (the subject ~0.9, a one-colour object ~0)."""
    return SUBJECT.score(image)


def is_subject(image) -> bool:
    return SUBJECT.shown(image)


def write_photos(out: Path) -> list[Path]:
    return SUBJECT.write_photos(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a toy subject's photos.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--subject", type=int, choices=(1, 2), default=1, help="which subject (default: 1, sks star)")
    args = parser.parse_args(argv)
    subject = SUBJECTS[args.subject - 1]
    try:
        paths = subject.write_photos(args.out)
    except OSError as err:
        raise SystemExit(f"error: {err}") from None
    for path in paths:
        print(path)
    print(f'instance prompt: "{subject.instance_prompt}"   class prompt: "{subject.class_prompt}"')


if __name__ == "__main__":
    main()
