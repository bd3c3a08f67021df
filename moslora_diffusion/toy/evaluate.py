"""Measures what a toy-world pipeline draws: generate from captions, read the images with the checker.

    python -m moslora_diffusion.toy.evaluate --model assets/toy-base --n 64 --grid assets/toy-base-samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..files.atomic import save_image
from .checker import check
from .pair_checker import check_pair
from .pairs import pair_caption, sample_pair
from .world import caption, render, sample_scene

ATTRIBUTES = ("cls", "colour", "size", "position", "background")


def generate(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 5.0, batch: int = 16):
    """PIL images, one per prompt; deterministic for a seed (one CPU generator drives every batch)."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch):
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   height=64, width=64)
        images.extend(out.images)
    return images


def evaluate_base(pipe, n: int = 64, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                  split: str = "heldout") -> dict:
    """Accuracy of each attribute over `n` generations from full captions of `split` scenes.

    split "heldout": (class, colour, background) combinations pretraining never showed; "train": seen ones.
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split=split) for _ in range(n)]
    images = generate(pipe, [caption(s) for s in scenes], seed, steps, guidance)
    readings = [check(im) for im in images]
    result = {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "split": split,
              "object_found": float(np.mean([r.cls is not None for r in readings]))}
    for attr in ATTRIBUTES:
        result[f"{attr}_accuracy"] = float(np.mean([getattr(r, attr) == getattr(s, attr)
                                                    for r, s in zip(readings, scenes, strict=True)]))
    return result


def evaluate_pairs(pipe, n: int = 64, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                   split: str = "heldout") -> dict:
    """Two-object captions (pairs.py, every colour and the background named): the share of `n` generations in
    which the pair checker finds both objects with the caption's class, colour and position (`pair_success`),
    and each attribute's accuracy over the 2n objects. split as in evaluate_base (a pair is held out when
    either object's combination is)."""
    rng = np.random.default_rng(seed)
    pairs = [sample_pair(rng, split=split) for _ in range(n)]
    images = generate(pipe, [pair_caption(p) for p in pairs], seed, steps, guidance)
    readings = [check_pair(im) for im in images]
    hits = {attr: [] for attr in ("cls", "colour")}
    success, two = [], []
    for pair, reading in zip(pairs, readings, strict=True):
        found = [reading.at(o.position) for o in pair.objects]
        for attr in hits:
            hits[attr] += [f is not None and getattr(f, attr) == getattr(o, attr)
                           for f, o in zip(found, pair.objects, strict=True)]
        two.append(reading.axis == pair.axis)
        success.append(all(f is not None and f.cls == o.cls and f.colour == o.colour
                           for f, o in zip(found, pair.objects, strict=True)))
    return {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "split": split,
            "two_objects_found": float(np.mean(two)), "pair_success": float(np.mean(success)),
            **{f"pair_{attr}_accuracy": float(np.mean(v)) for attr, v in hits.items()}}


def sample_grid(pipe, n_captions: int = 8, per_caption: int = 3, seed: int = 0, split: str = "heldout",
                steps: int = 25, guidance: float = 5.0, scale: int = 2) -> Image.Image:
    """Rows of: caption | what the world renders for it | `per_caption` generations."""
    rng = np.random.default_rng(seed + 1000)
    scenes = [sample_scene(rng, split=split) for _ in range(n_captions)]
    prompts = [caption(s) for s in scenes]
    images = generate(pipe, [p for p in prompts for _ in range(per_caption)], seed, steps, guidance)
    side, text_w = 64 * scale, 420
    grid = Image.new("RGB", (text_w + side * (per_caption + 1) + 8, side * n_captions), "white")
    draw = ImageDraw.Draw(grid)
    for row, (scene, prompt) in enumerate(zip(scenes, prompts, strict=True)):
        draw.text((4, row * side + side // 2 - 6), prompt, fill="black")
        grid.paste(render(scene).resize((side, side), Image.NEAREST), (text_w, row * side))
        for k in range(per_caption):
            image = images[row * per_caption + k].resize((side, side), Image.NEAREST)
            grid.paste(image, (text_w + 8 + side * (k + 1), row * side))
    return grid


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("assets/toy-base"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"])
    parser.add_argument("--grid", type=Path, help="also write a captions-vs-generations grid image here")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_base(pipe, args.n, args.seed, args.steps, args.guidance, args.split)
    print(json.dumps(result, indent=2))
    if args.grid:
        grid = sample_grid(pipe, seed=args.seed, steps=args.steps, guidance=args.guidance)
        save_image(grid, args.grid, Image.registered_extensions().get(args.grid.suffix.lower(), "PNG"))
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
