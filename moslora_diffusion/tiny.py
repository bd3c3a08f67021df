"""Write a tiny, randomly initialised SD 1.x / SD 2.x / SDXL pipeline to a folder, without any download.

    python -m moslora_diffusion.tiny --family sd15 --out tiny-sd15     # also: sd2, sdxl

The builders live in models/tiny.py; this module is the command only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .console import OneLineErrorParser, add_debug_flag, run_command
from .models.tiny import FAMILY_ALIASES, save_tiny_pipeline


def _tiny(argv: list[str]) -> None:
    parser = OneLineErrorParser(prog="python -m moslora_diffusion.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=sorted(FAMILY_ALIASES))
    parser.add_argument("--out", required=True, type=Path, help="folder to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        what = "is not empty" if args.out.is_dir() else "is a file"
        raise FileExistsError(f"--out {args.out} exists and {what}; choose a new folder")
    save_tiny_pipeline(args.family, args.out, seed=args.seed, prediction_type=args.prediction_type)
    print(f"saved tiny {FAMILY_ALIASES[args.family]} pipeline to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """`error: ...` and exit status 2 for bad input (console/exits.py), 0 when the model is written."""
    return run_command(_tiny, argv)


if __name__ == "__main__":
    sys.exit(main())
