"""How often generated images show the toy subject, per prompt, base model vs adapted.

Reads the PNGs that `moslora_diffusion.generate` (or the app) wrote, takes each image's prompt and adapter
scales from its `parameters` text, and scores it with `subject.is_subject`; class-prompt images are also
read by the checker, to show that they still vary. Prints a table and writes `subject_check.json` beside
the images.

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
from .subject import TOKEN, is_subject
from .world import BACKGROUND_COLOURS

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
            label = "adapted" if any(request.scales.values()) else "base"
            groups[(request.prompt, label)].append(image.convert("RGB"))
    return groups


def prompted_background(prompt: str) -> str | None:
    """The background colour a prompt names ("..., on a green background"), or None."""
    found = BACKGROUND.search(prompt)
    return found.group(1) if found and found.group(1) in BACKGROUND_COLOURS else None


def summarise(groups: dict[tuple[str, str], list]) -> list[dict]:
    rows = []
    for (prompt, label), images in sorted(groups.items()):
        readings = [check(im) for im in images]
        background = prompted_background(prompt)
        rows.append({"prompt": prompt, "model": label, "images": len(images),
                     "instance_prompt": TOKEN in prompt.split(),
                     "subject_share": sum(map(is_subject, images)) / len(images),
                     "distinct_colour_background": len({(r.colour, r.background) for r in readings}),
                     "background_as_prompted": None if background is None else
                     sum(r.background == background for r in readings) / len(images)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of generated PNGs (searched recursively)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"error: {args.folder} is not a folder")
    rows = summarise(read_samples(args.folder))
    if not rows:
        raise SystemExit(f"error: no generated PNGs with a `parameters` text under {args.folder}")
    print("| prompt | model | images | subject shown | background as prompted | distinct (colour, background) |\n"
          "|---|---|---:|---:|---:|---:|")
    for r in rows:
        shown = "" if r["background_as_prompted"] is None else f"{r['background_as_prompted']:.0%}"
        print(f"| {r['prompt']} | {r['model']} | {r['images']} | {r['subject_share']:.0%} | {shown} | "
              f"{r['distinct_colour_background']} |")
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(args.folder / "subject_check.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return rows


if __name__ == "__main__":
    main()
