"""Generate from the command line with a base model and trained adapters (the app's code, no UI).

    python -m moslora_diffusion.generate --base assets/toy-base --adapter outputs/demo:1.0 \
        --prompt "a photo of sks star, on a green background" --seeds 0 1 2 --out outputs/demo/samples

Each PNG carries the same A1111-style `parameters` text as the app's images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .app.state import check_output_folder, open_app_state
from .console import OneLineErrorParser, add_debug_flag, run_command
from .formats.export_targets import parse_adapter_spec
from .generation.flags import add_request_flags
from .generation.long_prompts import warn_long_prompts
from .generation.text_to_image import GenerationRequest, validate_command_request


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m moslora_diffusion.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="hub id, diffusers folder or single .safetensors file")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                        help="training output folder or adapter file, optionally with a scale (default 1.0)")
    add_request_flags(parser)
    parser.add_argument("--compare_with_base", action="store_true", help="also render each seed at scale 0")
    parser.add_argument("--config", default=None, help="diffusers folder with the configs of a single-file base")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs, which go to <out>/<date>/ "
                        "as mole generate's (new names; nothing in it is overwritten)")
    add_debug_flag(parser)
    return parser


def _requests(args: argparse.Namespace, scales: dict[str, float], size: int) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, steps=args.steps,
                              guidance=args.guidance, width=size, height=size, scheduler=args.sampler, scales=scales,
                              compare_with_base=args.compare_with_base)
            for prompt in args.prompt for seed in args.seeds]


def run(args: argparse.Namespace) -> list[Path]:
    specs = [parse_adapter_spec(text) for text in args.adapter]
    # Every number is checked before the model loads. The model's own size is known only once it is loaded
    # (and is always valid), so 512 stands in for it here when --size is not given.
    for request in _requests(args, {}, args.size or 512):
        validate_command_request(request)
    check_output_folder(args.out, "--out")  # before the model loads
    state = open_app_state(args.base, args.out, adapters=[path for path, _ in specs], config=args.config)
    state.images = state.outputs  # <out>/<date>/, as `mole generate` writes (the app's outputs/images/<date>/)
    scales = dict(zip(state.fusion.names(), (scale for _, scale in specs), strict=True))
    requests = _requests(args, scales, args.size or state.default_size)
    for request in requests:  # before the bar: a warning printed inside its line is overwritten by the next redraw
        warn_long_prompts(state.pipe.tokenizer, {"prompt": request.prompt, "negative_prompt": request.negative_prompt})
    runs = 2 if args.compare_with_base else 1  # base and adapted
    count = len(requests) * runs
    bar = tqdm(total=sum(r.steps * runs for r in requests), desc=f"generating {count} image{'s' * (count != 1)}",
               unit="step", dynamic_ncols=True)
    written = []
    for request in requests:
        def advance(done: int, _total: int, start: int = bar.n) -> None:  # done: this request's steps so far
            bar.update(start + done - bar.n)

        written += [saved.path for saved in state.generate(request, advance)]
    bar.close()
    return written


def _generate(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    written = run(args)
    folders = sorted({str(path.parent) for path in written})
    noun = "image" if len(written) == 1 else "images"  # it printed "wrote 1 images"
    print(f"wrote {len(written)} {noun} in {', '.join(folders) or args.out}")


def main(argv: list[str] | None = None) -> int:
    """`error: ...` and exit status 2 for bad input (console/exits.py), 0 when the images are written."""
    return run_command(_generate, argv)


if __name__ == "__main__":
    sys.exit(main())
