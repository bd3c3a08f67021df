"""`python -m moslora_diffusion.mole train | generate | export`: compose trained subjects with MoLE.

    python -m moslora_diffusion.mole train --pretrained_model_name_or_path BASE --experts out/dog out/cat \
        --max_train_steps 200 --output_dir out/dog+cat          # flags as train_dreambooth.py; --help lists them
    python -m moslora_diffusion.mole generate --base BASE --mole out/dog+cat/mole.safetensors \
        --prompt "a photo of sks dog" --seeds 0 1 --out samples [--mask cat] [--scale dog=1.2] [--heatmap]
    python -m moslora_diffusion.mole export --base BASE --mole out/dog+cat/mole.safetensors \
        --to lora-kohya --out dog+cat.safetensors [--prompt ...]   # gates averaged over prompts, folded exactly

Every input is checked before the model loads where it can be; an error is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..checks import MAX_SEED, Range, check_number
from ..console import OneLineErrorParser, add_debug_flag, run_command
from ..files.atomic import check_not_an_input, check_output_folder, save_new_image
from ..formats.export_targets import DTYPES, TARGETS, check_inputs, check_output
from ..generation.flags import add_request_flags
from ..generation.text_to_image import GenerationRequest, native_size, save_png, validate_command_request
from ..models.loading import load_pipeline
from ..training.trainer.command import run_training_command
from .experts import MoLEError, check_scale
from .file import FILE_NAME, read_mole
from .gate_config import parse_gate_args
from .report import render_gate_heatmap

COMMANDS = ("train", "generate", "export")
COMMAND_HELP = {"train": "train the gates of 2 to 8 trained adapters (the experts) on their photos",
                "generate": "generate with every expert and the learned gates of a MoLE file",
                "export": "fold a MoLE into one standard LoRA or a merged checkpoint (gates averaged per block)"}
SEED = Range(0, MAX_SEED, integer=True)


def _scale(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected EXPERT=SCALE, e.g. dog=1.2") from None


def _common(parser: argparse.ArgumentParser, mole_required: bool = True) -> None:
    parser.add_argument("--base", required=True, help="the experts' base model: hub id, diffusers folder or "
                        "single .safetensors file")
    parser.add_argument("--config", default=None, help="diffusers folder with the configs of a single-file base")
    parser.add_argument("--mole", required=mole_required, type=Path, help="mole.safetensors (or the training folder)")
    parser.add_argument("--mask", nargs="+", default=[], metavar="EXPERT",
                        help="experts to leave out; the others' gates are renormalised (the paper's second mode)")
    parser.add_argument("--scale", nargs="+", type=_scale, default=[], metavar="EXPERT=SCALE",
                        help="an extra scale per expert (default 1)")
    add_debug_flag(parser)


def generate_parser(mole_required: bool = True) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m moslora_diffusion.mole generate",
                                description="Generate with every expert and the learned gates of a MoLE file.")
    _common(parser, mole_required)
    add_request_flags(parser)
    parser.add_argument("--heatmap", action="store_true", help="also write <image>-gates.png beside each image: "
                        "the gate weight of each expert in each block")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m moslora_diffusion.mole export",
                                description="Fold a MoLE into one standard LoRA or a merged checkpoint: the "
                                "gates averaged per block over prompts, then folded exactly.",
                                epilog="A regional layout of several experts (LoRA files, no MoLE file) exports "
                                "with --to comfyui-workflow --experts A B --region A=x0,y0,x1,y1 ... (a ComfyUI "
                                "workflow, the masks and A1111 Regional Prompter text); its flags: "
                                "`python -m moslora_diffusion.mole export --to comfyui-workflow --help`.")
    _common(parser)
    parser.add_argument("--to", required=True, choices=TARGETS, dest="target")
    parser.add_argument("--out", required=True, type=Path, help="output file (.safetensors) or folder")
    parser.add_argument("--prompt", action="append", default=[], help="prompts to average the gates over "
                        "(repeatable; default: the experts' trigger prompts, which are always included)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def mole_file(path: Path) -> Path:
    """The MoLE file of --mole (a file, or a gate-training folder holding mole.safetensors). MoLEError for a
    DreamBooth training folder, which holds one expert's adapter and no gates."""
    if path.is_dir() and not (path / FILE_NAME).exists() and (path / "moslora.safetensors").is_file():
        raise MoLEError(f"--mole {path} is a DreamBooth training folder (one expert's moslora.safetensors), not a "
                        "MoLE: give it with --experts, or train gates over several experts with `python -m "
                        "moslora_diffusion.mole train`")
    return path / FILE_NAME if path.is_dir() else path


def _load(args: argparse.Namespace):
    """The base pipeline with the MoLE file attached, masks and scales set; the file is read (and its expert
    names checked against --mask / --scale) before the model loads."""
    from . import inference
    from .file import load_mole

    path = mole_file(args.mole)
    names = [e.name for e in read_mole(path).experts]
    unknown = sorted((set(args.mask) | {n for n, _ in args.scale}) - set(names))
    if unknown:
        raise MoLEError(f"no expert {', '.join(unknown)} in {path}; its experts are {', '.join(names)}")
    for name, scale in args.scale:
        check_scale(scale, name)
    pipe = load_pipeline(args.base, config=args.config)
    pipe.set_progress_bar_config(disable=True)
    mole = load_mole(pipe, path)
    inference.configure(mole, args.mask, dict(args.scale))
    return pipe, mole, path


def run_generate(args: argparse.Namespace) -> list[Path]:
    from .inference import generate_mole

    requests = [GenerationRequest(prompt=p, negative_prompt=args.negative_prompt, seed=s, steps=args.steps,
                                  guidance=args.guidance, width=args.size or 512, height=args.size or 512,
                                  scheduler=args.sampler) for p in args.prompt for s in args.seeds]
    for request in requests:  # every number checked before the model loads
        validate_command_request(request)
    check_output_folder(args.out, "--out")
    pipe, mole, path = _load(args)
    size = args.size or native_size(pipe, 512)  # the generate command's default (>= 64 px)
    written = []
    for request in tqdm(requests, desc="generating", unit="image", dynamic_ncols=True):
        request.width = request.height = size
        images, report = generate_mole(pipe, mole, request, Path(str(args.base)).name, path.name)
        written += [save_png(image, args.out) for image in images]
        if args.heatmap:  # beside its image, named after it: a new name, never over an earlier run's or the user's
            image_path = written[-1]
            written.append(save_new_image(render_gate_heatmap(report, mole.expert_names), image_path.parent,
                                          (f"{image_path.stem}-gates{f'-{k}' if k else ''}.png"
                                           for k in itertools.count())))
    return written


def run_export(args: argparse.Namespace) -> Path:
    from .static_export import average_gates, export_static

    check_not_an_input(args.out, [args.mole, mole_file(args.mole)], "--out")
    check_inputs([], args.out, [args.base, args.config])  # nor the base model (a merged export of ours was one)
    for seed in args.seeds:
        check_number("--seeds", seed, SEED)
    if any(not p.strip() for p in args.prompt):
        raise MoLEError("--prompt: an empty prompt; give the prompt text, or leave --prompt out")
    check_output(args.target, args.out.expanduser(), args.overwrite)
    pipe, mole, _ = _load(args)
    prompts = list(dict.fromkeys([e.trigger_prompt for e in mole.experts if e.trigger_prompt] + args.prompt))
    weights = average_gates(pipe, prompts or None, seeds=args.seeds)
    return export_static(pipe, weights, args.target, args.out, args.dtype, args.overwrite, base=str(args.base))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: python -m moslora_diffusion.mole {{{','.join(COMMANDS)}}} ... (--help after a command lists "
             "its options)")
    if argv[:1] in (["-h"], ["--help"]):  # asked for: the usage and the commands on stdout, exit status 0
        print(f"{usage}\n\n" + "\n".join(f"  {name:<9} {text}" for name, text in COMMAND_HELP.items()))
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"error: unknown command {argv[0]!r}; " if argv else ""
        print(f"{problem}{usage}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .gate_training import train_gates

        return run_training_command(parse_gate_args, train_gates, rest)
    parser = generate_parser() if command == "generate" else export_parser()

    def body(args_list: list[str]) -> None:
        args = parser.parse_args(args_list)
        result = run_generate(args) if command == "generate" else run_export(args)
        print(f"wrote {len(result)} file{'s' if len(result) != 1 else ''} under {args.out}" if command == "generate"
              else f"wrote {result}")

    return run_command(body, rest)
