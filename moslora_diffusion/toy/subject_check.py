"""How often generated images show the toy concepts, per prompt, base model vs adapted.

Reads the PNGs that `moslora_diffusion.generate` (or the app) wrote, takes each image's prompt and adapter
scales from its `parameters` text, and reads each image's patterns (`patterns.py`): the first subject's
stripes (`sks star`), the second subject's checkerboard (`v square`), the zigzag background (`z`), and bleed:
a subject's pattern in an image whose prompt does not name that subject. Every image is also read by the
checker: whether it draws an object at all (a model that lost its class draws "a photo of a star" as an empty
background), whether the checker reads that object as the class the prompt names (a strict reading: the toy
base's own stars are rough, and the checker reads most of them as diamonds or circles), and how much the class
prompt's images still vary. Prints a table and writes `subject_check.json` beside the images.

    python -m moslora_diffusion.toy.subject_check outputs/demo/samples
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

from ..files.atomic import atomic_write
from ..generation.text_to_image import parse_infotext
from .checker import check
from .concepts import BACKGROUND as ZIGZAG_CONCEPT
from .patterns import PATTERN_THRESHOLD, ZIGZAG_THRESHOLD, read_patterns
from .subject import SUBJECT, SUBJECT_2, SUBJECTS
from .world import BACKGROUND_COLOURS, CLASSES

BACKGROUND = re.compile(r"on an? (\w+)(?: \w+)? background")


def read_samples(folder: Path) -> dict[tuple[str, str], list]:
    """(prompt, "base" | "adapted") -> images, for every PNG under `folder` with a `parameters` text."""
    groups = defaultdict(list)
    for path in sorted(folder.rglob("*.png")):
        with Image.open(path) as image:
            text = image.info.get("parameters")
            if text is None:
                continue
            try:
                request = parse_infotext(text)
            except (KeyError, ValueError):  # another tool's parameters text: not ours to score
                print(f"warning: skipped {path}: its `parameters` text is not this project's", file=sys.stderr)
                continue
            label = ("mole" if request.mole is not None else  # `mole generate`: every expert, learned gates
                     "adapted" if any(request.scales.values()) else "base")
            groups[(request.prompt, label)].append(image.convert("RGB"))
    return groups


def prompted_background(prompt: str) -> str | None:
    """The background colour a prompt names ("..., on a green background"), or None."""
    found = BACKGROUND.search(prompt)
    return found.group(1) if found and found.group(1) in BACKGROUND_COLOURS else None


def named_triggers(prompt: str) -> set[str]:
    """The concepts' trigger words a prompt contains ("a photo of sks star, on a z background" -> sks, z)."""
    words = set(re.findall(r"\w+", prompt.lower()))
    return words & ({s.token for s in SUBJECTS} | {ZIGZAG_CONCEPT.token})


def prompted_class(prompt: str) -> str | None:
    """The toy-world class a prompt names ("a photo of sks star" -> star), or None; the last one named wins."""
    named = [word for word in re.findall(r"\w+", prompt.lower()) if word in CLASSES]
    return named[-1] if named else None


def summarise(groups: dict[tuple[str, str], list]) -> list[dict]:
    """One row per (prompt, model): the share of images showing each concept, bleed, and the checker's
    background and diversity readings."""
    rows = []
    for (prompt, label), images in sorted(groups.items()):
        readings = [check(im) for im in images]
        patterns = [read_patterns(im) for im in images]
        named = named_triggers(prompt)
        shown = {s.token: [p.object_scores[s.pattern] >= PATTERN_THRESHOLD for p in patterns] for s in SUBJECTS}
        unnamed = [s.token for s in SUBJECTS if s.token not in named]
        background = prompted_background(prompt)
        cls = prompted_class(prompt)
        rows.append({"prompt": prompt, "model": label, "images": len(images),
                     "instance_prompt": SUBJECT.token in named, "named": sorted(named),
                     "subject_share": sum(shown[SUBJECT.token]) / len(images),
                     "subject_2_share": sum(shown[SUBJECT_2.token]) / len(images),
                     "zigzag_share": sum(p.zigzag >= ZIGZAG_THRESHOLD for p in patterns) / len(images),
                     "bleed_share": sum(any(shown[t][i] for t in unnamed) for i in range(len(images))) / len(images),
                     "object_share": sum(r.cls is not None for r in readings) / len(images),
                     "class_read_share": None if cls is None else sum(r.cls == cls for r in readings) / len(images),
                     "distinct_colour_background": len({(r.colour, r.background) for r in readings}),
                     "background_as_prompted": None if background is None else
                     sum(r.background == background for r in readings) / len(images)})
    return rows


def print_table(rows: list[dict]) -> None:
    subject_columns = " | ".join(f"{s.token} {s.class_noun} shown" for s in SUBJECTS)
    print(f"| prompt | model | images | an object drawn at all | {subject_columns} | "
          f"{ZIGZAG_CONCEPT.token} background shown | unnamed subject shown (bleed) | background as prompted | "
          "distinct (colour, background) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        shown = "" if r["background_as_prompted"] is None else f"{r['background_as_prompted']:.0%}"
        print(f"| {r['prompt']} | {r['model']} | {r['images']} | {r['object_share']:.0%} | {r['subject_share']:.0%} | "
              f"{r['subject_2_share']:.0%} | {r['zigzag_share']:.0%} | {r['bleed_share']:.0%} | {shown} | "
              f"{r['distinct_colour_background']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of generated PNGs (searched recursively)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"error: {args.folder} is not a folder")
    rows = summarise(read_samples(args.folder))
    if not rows:
        raise SystemExit(f"error: no generated PNGs with a `parameters` text under {args.folder}")
    print_table(rows)
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(args.folder / "subject_check.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return rows


if __name__ == "__main__":
    main()
