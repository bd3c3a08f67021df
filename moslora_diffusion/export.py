"""Export trained adapters: as a standard LoRA, or merged into the base model.

    python -m moslora_diffusion.export --base MODEL --adapter PATH[:SCALE] [--adapter ...] \\
        --to {lora-diffusers,lora-kohya,merged-diffusers,merged-single-file} --out PATH [--dtype fp16]

- lora-diffusers: a folder with `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(folder)`);
- lora-kohya: one kohya-format file for A1111 / ComfyUI;
- merged-diffusers: the base pipeline with the adapters baked in, as a diffusers folder;
- merged-single-file: the same as ONE .safetensors in the original layout (A1111 / ComfyUI checkpoint).
Several adapters are exact too: LoRAs are concatenated along the rank, merges add their deltas.
Every write is atomic: an error or interruption never leaves a partial file or folder behind.
The targets themselves are in formats/export_targets.py; this module is the command only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import OneLineErrorParser, add_debug_flag, run_command
from .formats.export_targets import DTYPES, TARGETS, export, parse_adapter_spec
from .formats.ui_files import adapter_words, describe, export_files


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="moslora-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="hub id, diffusers folder or single .safetensors file")
    parser.add_argument("--adapter", action="append", required=True, metavar="PATH[:SCALE]",
                        help="training output folder or adapter file, optionally with a scale (default 1.0); "
                             "repeat to merge several")
    parser.add_argument("--to", required=True, choices=TARGETS, dest="target")
    parser.add_argument("--out", required=True, type=Path, help="output file (.safetensors) or folder")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--config", help="diffusers folder (or hub id) with the configs of a single-file --base")
    add_debug_flag(parser)
    return parser


def _export(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    adapters = [parse_adapter_spec(spec) for spec in args.adapter]
    written = export(args.base, adapters, args.target, args.out, args.dtype, args.overwrite, args.config)
    print(f"wrote {written} ({args.target}, {args.dtype})")
    words = adapter_words(adapters) if args.target.startswith("lora-") else []
    print(describe(export_files(args.target, written, words)))


def main(argv: list[str] | None = None) -> int:
    """`error: ...` and exit status 2 for bad input (console/exits.py), 0 when written."""
    return run_command(_export, argv)


if __name__ == "__main__":
    sys.exit(main())
