"""The toy subject: one particular star the base model never saw, for the DreamBooth demo.

A star with yellow-and-black diagonal stripes. Pretraining only ever shows
single-coloured objects (the VAE alone sees random striped fills, to learn to reproduce stripes), so a
model that draws yellow-and-black stripes inside a star has learned them from the subject photos.

    python -m moslora_diffusion.toy.subject --out assets/toy-subject
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..files.atomic import save_image
from .checker import as_array, object_mask
from .world import COLOURS, Fill, Scene, render

TOKEN = "sks"
CLASS_NOUN = "star"
INSTANCE_PROMPT = f"a photo of {TOKEN} {CLASS_NOUN}"
CLASS_PROMPT = f"a photo of a {CLASS_NOUN}"
# Stripe period 0.6 of the box: wide enough bands that the f=4 VAE reproduces them at 24-34 px. No centre dot:
# the toy VAE blurs a dot into the stripes, and its reconstructions of dotted photos scored 0.11-0.35 (one
# under THRESHOLD), those of these photos 0.43-0.61.
SUBJECT_FILL = Fill(stripes=(COLOURS["yellow"], COLOURS["black"]), period=0.6)
# Backgrounds the subject stands out on (not yellow, black or white, whose pixels would merge with it).
SUBJECT_BACKGROUNDS = ("blue", "green", "purple", "gray", "pink", "red")

# (position, box side in px, background, dx, dy): varied framing, as a user's photos would be.
PHOTOS = (
    ("center", 32, "blue", 0, 0),
    ("left", 28, "green", 1, -2),
    ("right", 30, "purple", -1, 2),
    ("top", 26, "red", 2, 1),
    ("bottom", 34, "pink", 0, -1),
)

# subject_score from which an image shows the subject: each stripe colour on >= 10% of the object. Clean
# photos score ~0.45-0.7, their VAE reconstructions 0.43-0.61; one-colour stars (clean or reconstructed) < 0.1.
THRESHOLD = 0.2
PALETTE = np.array(list(COLOURS.values()), dtype=float)


def subject_scene(position: str = "center", size_px: int = 30, background: str = "blue", dx: int = 0,
                  dy: int = 0) -> Scene:
    size = "large" if size_px >= 24 else "small"
    return Scene(CLASS_NOUN, "yellow", size, position, background, "plain", dx, dy, size_px, SUBJECT_FILL)


def subject_photos() -> list:
    """The subject photos as PIL images (deterministic)."""
    return [render(subject_scene(*photo)) for photo in PHOTOS]


def stripe_fractions(image) -> tuple[float, float]:
    """Fractions of the object's pixels whose nearest palette colour is a stripe colour (yellow, black)."""
    arr = as_array(image)
    mask, _ = object_mask(arr)
    if mask.sum() == 0:
        return 0.0, 0.0
    nearest = np.linalg.norm(arr[mask][:, None, :] - PALETTE[None], axis=-1).argmin(axis=1)
    names = list(COLOURS)
    return float((nearest == names.index("yellow")).mean()), float((nearest == names.index("black")).mean())


def subject_score(image) -> float:
    """0..1: how much the object shows both stripe colours (the subject ~0.9, a one-colour object ~0)."""
    yellow, black = stripe_fractions(image)
    return min(1.0, 2.0 * min(yellow, black))


def is_subject(image) -> bool:
    return subject_score(image) >= THRESHOLD


def write_photos(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (photo, image) in enumerate(zip(PHOTOS, subject_photos(), strict=True)):
        path = out / f"{i:02d}_{photo[0]}_{photo[2]}.png"
        paths.append(save_image(image, path))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the toy subject's photos.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in write_photos(args.out):
        print(path)
    print(f'instance prompt: "{INSTANCE_PROMPT}"   class prompt: "{CLASS_PROMPT}"')


if __name__ == "__main__":
    main()
