"""The command-line flags of an image request, shared by `python -m moslora_diffusion.generate` and
`python -m moslora_diffusion.mole generate` (what a GenerationRequest holds, text_to_image.py)."""

from __future__ import annotations

import argparse

from .text_to_image import SCHEDULERS


def image_side(text: str) -> int:
    """--size: a whole number of pixels above 0 (its range is the request's check: 64..2048, a multiple of 8)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels, e.g. 512") from None
    if value <= 0:  # 0 read as "not given" and drew at the model's own size
        raise argparse.ArgumentTypeError(f"{value} px: give the image's side in pixels (64 to 2048, a multiple of "
                                         "8), or leave --size out for the model's own size")
    return value


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """--prompt (repeatable), --negative_prompt, --seeds, --steps, --guidance, --size, --sampler."""
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative_prompt", default="", help="what the images should not show")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per seed and prompt; -1: a "
                        "random seed (as in A1111), recorded in the PNG")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--size", type=image_side, default=None, help="width and height in px (default: the model's "
                        "own)")
    parser.add_argument("--sampler", default="DPM++ 2M", choices=tuple(SCHEDULERS), metavar="NAME",
                        help=f"one of: {', '.join(SCHEDULERS)}")
