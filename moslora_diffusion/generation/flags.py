"""The command-line flags of an image request, shared by `python -m moslora_diffusion.generate` and
`python -m moslora_diffusion.mole generate` (what a GenerationRequest holds, text_to_image.py)."""

from __future__ import annotations

import argparse


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """--prompt (repeatable), --negative_prompt, --seeds, --steps, --guidance, --size, --sampler."""
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="width and height (default: the model's own)")
    parser.add_argument("--sampler", default="DPM++ 2M")
