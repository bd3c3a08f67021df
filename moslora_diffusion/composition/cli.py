"""`python -m moslora_diffusion.mole generate --method ...`: the one command for every composition method.

    python -m moslora_diffusion.mole generate --base BASE --experts out/star out/square --method regional \\
        --region star=0,0,0.5,1 --region square=0.5,0,1,1 --region_prompt star="a photo of sks star" \\
        --prompt "sks star and v square" --out samples          # images + <image>-mask-<expert>.png
    python -m moslora_diffusion.mole generate --base BASE --mole out/mole.safetensors --method auto \\
        [--trigger star=sks] --prompt "sks star and v square" --out samples
    python -m moslora_diffusion.mole generate --base BASE --mole out/mole.safetensors --prompt ... --out samples
        # --method mole (the default with --mole): MoLE's learned gates, as before (--mask, --heatmap)

Experts come from a MoLE file (--mole: its experts, and its gates for mole / spatial_mole) or from LoRA files
(--experts: ours, diffusers or kohya). `train` and `export` are mole/cli.py's. Every input (method, regions,
masks, trigger words, numbers, the output folder) is checked before the model loads; an error is one line.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

from ..console import run_command
from ..files.atomic import check_output_folder
from ..generation.text_to_image import (
    REQUEST_RANGES,
    GeneratedImage,
    GenerationRequest,
    format_infotext,
    native_size,
    save_png,
    validate_command_request,
)
from ..mole import cli as mole_cli
from ..mole.experts import MoLEError, check_scale, expert_prompts
from ..mole.file import read_mole
from .api import BLENDS, GATED_METHODS, METHODS, OPTIONS, check_layout
from .regions import CompositionError, Region, check_mask_not_empty
from .report import read_mask_picture, save_mask_pictures


def _pair(kind: str, example: str):
    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected EXPERT={kind}, e.g. {example}")
        return name, value
    return parse


class _Once(argparse.Action):
    """A flag given at most once (a second --background silently replaced the first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            raise CompositionError(f"{option_string} given twice; one expert draws the background")
        setattr(namespace, self.dest, values)


def generate_parser() -> argparse.ArgumentParser:
    parser = mole_cli.generate_parser(mole_required=False)
    parser.description = ("Generate with several experts composed in one image (--method; default: regional with "
                          "regions, else mole with --mole, else nla).")
    parser.add_argument("--method", choices=METHODS, default=None, help="how the experts are composed (default: "
                        "regional when regions are given, else mole with --mole, else nla)")
    parser.add_argument("--experts", nargs="+", default=[], metavar="LORA", help="expert LoRA files or training "
                        "folders (ours, diffusers, kohya), instead of a MoLE file's experts")
    parser.add_argument("--region", action="append", type=_pair("x0,y0,x1,y1", "star=0,0,0.5,1"), default=[],
                        metavar="EXPERT=x0,y0,x1,y1",
                        help="an expert's box as fractions of the width and height (repeat per expert)")
    parser.add_argument("--region_mask", action="append", type=_pair("MASK.png", "star=star.png"), default=[],
                        metavar="EXPERT=MASK.png",
                        help="an expert's mask: a greyscale PNG of the image's size, white = the region")
    parser.add_argument("--region_prompt", action="append", type=_pair("PROMPT", 'star="a photo of sks star"'),
                        default=[], metavar="EXPERT=PROMPT",
                        help="the prompt an expert's region reads (default: the global prompt)")
    parser.add_argument("--trigger", action="append", type=_pair("WORD", "star=sks"), default=[],
                        metavar="EXPERT=WORD",
                        help="auto: an expert's trigger word (default: from its training prompt)")
    parser.add_argument("--auto_steps", type=int, default=None, help="auto: the first steps whose cross-attention "
                        "gives the masks (default: steps / 5)")
    parser.add_argument("--threshold", type=float, default=None, help="auto: a position joins an expert's region "
                        "when its attention is at least this share of the map's peak (default 0.4)")
    parser.add_argument("--every", type=int, default=None, help="switch: denoising steps per expert")
    parser.add_argument("--blend", choices=BLENDS, default=None, help="regional: 'attention' (default) blends each "
                        "cross-attention's output per position, one UNet forward a step; 'latent' denoises each "
                        "region with its expert alone and blends the predictions, one forward per expert (+ the "
                        "base where the regions leave room); 'inpaint' draws the first region's expert (or "
                        "--background) over the whole image, then each other region's expert into its region over "
                        "that picture, one pass per expert")
    parser.add_argument("--background", default=None, metavar="EXPERT", action=_Once, help="regional: the expert "
                        "that draws wherever the regions leave room, instead of the base model (give it no "
                        "region), e.g. a learned background")
    parser.add_argument("--fit_steps", type=int, default=None, metavar="N", help="regional --blend latent or "
                        "inpaint: after N denoising steps each region shrinks to its subject's outline and the rest "
                        "of it goes to the background (latent: --background, else the base model; inpaint: the "
                        "picture so far): one background around every subject")
    return parser


def _box(name: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        hint = (f" (for a mask picture use --region_mask {name}={text})" if _looks_like_file(text) else "")
        raise CompositionError(f"--region {name}={text}: a box is 4 numbers x0,y0,x1,y1{hint}") from None


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _looks_like_file(text: str) -> bool:
    """True for a --region value that names a picture (an image suffix, or an existing file) instead of a box."""
    if text.strip().lower().endswith(_IMAGE_SUFFIXES):
        return True
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def regions_from(args: argparse.Namespace) -> list[Region]:
    """One Region per expert named by --region / --region_mask / --region_prompt (mask files read here)."""
    boxes, masks, prompts = dict(args.region), dict(args.region_mask), dict(args.region_prompt)
    for flag, pairs in (("--region", args.region), ("--region_mask", args.region_mask),
                        ("--region_prompt", args.region_prompt)):
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise CompositionError(f"{flag} given twice for one expert; give one per expert")
    return [Region(name, _box(name, boxes[name]) if name in boxes else None,
                   _mask(name, masks[name]) if name in masks else None, prompts.get(name))
            for name in dict.fromkeys([*boxes, *masks, *prompts])]


def _mask(name: str, path: str):
    """The mask file of --region_mask NAME=PATH; an all-black one is refused naming both (check_mask_not_empty)."""
    mask = read_mask_picture(path)
    check_mask_not_empty(mask, f"--region_mask {name}={path}")
    return mask


def _options(args: argparse.Namespace) -> dict:
    given = {"triggers": dict(args.trigger) or None, "auto_steps": args.auto_steps, "threshold": args.threshold,
             "every": args.every, "blend": args.blend, "background": args.background, "fit_steps": args.fit_steps}
    return {k: v for k, v in given.items() if v is not None}


def _method(args: argparse.Namespace, regions: list[Region]) -> str:
    """--method, else regional when regions are given (with --mole too: they ask for a layout), else mole with
    --mole, else nla."""
    if args.method:
        return args.method
    return "regional" if regions else "mole" if args.mole else "nla"


# compose()'s option -> the flag that gives it (messages name flags, not keyword arguments)
OPTION_FLAGS = {"blend": "--blend", "every": "--every", "triggers": "--trigger", "auto_steps": "--auto_steps",
                "threshold": "--threshold", "background": "--background", "fit_steps": "--fit_steps"}


def _check_option_flags(args: argparse.Namespace, method: str, options: dict) -> None:
    """A flag of another method's, named with the method it belongs to (before compose()'s own check)."""
    owners = {option: owner for owner, names in OPTIONS.items() for option in names}
    for option in options:
        owner = owners.get(option)
        if owner is not None and option not in OPTIONS.get(method, ()):
            chosen = f"--method {method}" + ("" if args.method else " (the default here)")
            extra = " and --region / --region_mask" if owner == "regional" else ""
            raise CompositionError(f"{OPTION_FLAGS[option]} is for --method {owner}{extra}; this run has {chosen}")


def _check_repeats(args: argparse.Namespace) -> None:
    names = [n for n, _ in args.trigger]
    if len(set(names)) != len(names):
        raise CompositionError("--trigger given twice for one expert; give one per expert")


def _experts_before_loading(args: argparse.Namespace):
    """(expert names, {name: (training prompt, class prompt)}, the MoLE file or None), nothing loaded."""
    if bool(args.mole) == bool(args.experts):
        raise CompositionError("give the experts either as --mole FILE or as --experts LORA [LORA ...]")
    if args.experts:  # their training prompts from the files' headers: auto's trigger words are checked now
        prompts = expert_prompts(args.experts)
        return list(prompts), prompts, None
    stored = read_mole(mole_cli.mole_file(args.mole))
    return [e.name for e in stored.experts], {e.name: (e.trigger_prompt, e.class_prompt) for e in stored.experts}, \
        stored


def _image_size(args: argparse.Namespace, regions: list[Region]) -> int | None:
    """--size, else the size of the first mask (square images: --size is one number), else None (the model's).
    A mask that cannot be an image's size is named here (the request's own check would only name a width)."""
    masks = [r for r in regions if r.mask is not None]
    if args.size or not masks:
        return args.size
    region = masks[0]
    height, width = region.mask.shape[:2] if getattr(region.mask, "ndim", 0) == 2 else (0, 0)
    side = REQUEST_RANGES["width"]
    if height != width:
        raise CompositionError(f"--region_mask {region.expert}: the mask is {width}x{height}, but this command draws "
                               "square images (--size is one number): give a square mask")
    if width % 8 or not side.lower <= width <= side.upper:
        raise CompositionError(f"--region_mask {region.expert}: the mask is {width}x{height}; without --size the "
                               f"image takes the mask's size, which must be square with sides a multiple of 8 "
                               f"from {side.lower:g} to {side.upper:g}: give --size, or a mask of such a size")
    return width


def _check_auto(args: argparse.Namespace, names: list[str], prompts, options: dict) -> None:
    from .auto import auto_triggers, check_auto_options

    check_auto_options(args.steps, **options)
    given = options.get("triggers") or {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CompositionError(f"--trigger for expert {unknown[0]!r}, which is not there; the experts are "
                               f"{', '.join(names)}")
    for prompt in args.prompt:  # the experts' training prompts come from their files' headers: nothing loaded
        auto_triggers({n: p[0] for n, p in prompts.items()}, prompt, given, {n: p[1] for n, p in prompts.items()})


def _as_flags(message: str) -> str:
    """compose()'s message with the option it starts with named as the command's flag ("fit_steps 50: ..." ->
    "--fit_steps 50: ...")."""
    return re.sub(r"^(\w+)\b", lambda m: OPTION_FLAGS.get(m.group(1), m.group(1)), message, count=1)


def _check(args, method: str, regions: list[Region], names: list[str], prompts, size: int | None) -> dict:
    """Every flag that can be checked before the model loads; returns compose()'s options."""
    try:
        return _check_flags(args, method, regions, names, prompts, size)
    except CompositionError as err:
        raise CompositionError(_as_flags(str(err))) from None


def _check_flags(args, method: str, regions: list[Region], names: list[str], prompts, size: int | None) -> dict:
    options = _options(args)
    _check_option_flags(args, method, options)
    if args.mask:  # masking an expert renormalises learned gates; other methods simply take fewer --experts
        raise CompositionError(f"--mask is for --method mole; with --method {method} leave the expert out of "
                               "--experts instead")
    if args.heatmap:
        raise CompositionError(f"--heatmap draws learned gates (--method mole); --method {method} has none (the "
                               "spatial methods write each expert's mask picture beside every image)")
    check_layout(method, names, regions, (size, size) if size else None, options, has_gates=False, steps=args.steps)
    unknown = sorted({n for n, _ in args.scale} - set(names))
    if unknown:
        raise MoLEError(f"no expert {', '.join(unknown)}; the experts are {', '.join(names)}")
    for name, scale in args.scale:
        check_scale(scale, name)
    if method == "auto":
        _check_auto(args, names, prompts, options)
    if method == "switch" and options.get("every") is not None:  # it was found only after the model loaded
        from .switch import check_every

        check_every(options["every"], len(names), args.steps)
    return options


def _infotext_pairs(method: str, experts, regions: list[Region], options: dict, mole_name: str | None) -> dict:
    pairs = {"Composition": method,
             "Experts": " | ".join(f"{e.name}: {e.scale:g}" for e in experts)}
    if mole_name:
        pairs["MoLE"] = mole_name
    if regions:
        pairs["Regions"] = " | ".join(r.describe() for r in regions)
    if options.get("blend"):
        pairs["Blend"] = options["blend"]
    if options.get("background"):
        pairs["Background"] = options["background"]
    if options.get("fit_steps"):
        pairs["Fit steps"] = str(options["fit_steps"])
    if options.get("triggers"):
        pairs["Triggers"] = " | ".join(f"{k}: {v}" for k, v in options["triggers"].items())
    return pairs


def _load(args: argparse.Namespace, stored, method: str):
    from ..models.loading import load_pipeline
    from ..mole import load_experts

    pipe = load_pipeline(args.base, config=args.config)
    pipe.set_progress_bar_config(disable=True)
    scales = dict(args.scale)
    if stored is None:
        experts = load_experts(pipe, args.experts, minimum=2 if method in GATED_METHODS else 1)
    else:
        experts = stored.experts
    return pipe, [replace(e, scale=scales.get(e.name, e.scale)) for e in experts]


def run_generate(args: argparse.Namespace) -> list[Path]:
    """Images (and each expert's mask picture for the spatial methods) for every prompt and seed."""
    from .api import compose

    regions = regions_from(args)
    method = _method(args, regions)
    _check_repeats(args)
    if method == "mole" and args.mole and not args.experts:
        options = _options(args)
        _check_option_flags(args, method, options)
        check_layout(method, [], regions, None, options, has_gates=True)  # regions on mole: one line
        return mole_cli.run_generate(args)  # MoLE's learned gates: the command as it always was
    names, prompts, stored = _experts_before_loading(args)
    if method in GATED_METHODS and stored is None:  # it drew with equal gates and labelled the image "mole"
        raise CompositionError(f"--method {method} needs trained gates: give a MoLE file (--mole, from `mole train`) "
                               "instead of --experts; with equal gates it would be --method nla")
    size = _image_size(args, regions)
    options = _check(args, method, regions, names, prompts, size)
    requests = [GenerationRequest(prompt=p, negative_prompt=args.negative_prompt, seed=s, steps=args.steps,
                                  guidance=args.guidance, width=size or 512, height=size or 512,
                                  scheduler=args.sampler) for p in args.prompt for s in args.seeds]
    for request in requests:
        validate_command_request(request)
    check_output_folder(args.out, "--out")
    pipe, experts = _load(args, stored, method)
    size = size or native_size(pipe, 512)  # the generate command's default (>= 64 px)
    gates = stored.gates if stored is not None and method in GATED_METHODS else None
    pairs = _infotext_pairs(method, experts, regions, options, args.mole.name if args.mole else None)
    written = []
    for request in (replace(r, width=size, height=size) for r in requests):
        result = compose(pipe, experts, method, request, regions, gates, **options)
        for i, image in enumerate(result.images):
            text = format_infotext(request, request.seed + i, {}, Path(str(args.base)).name, pairs)
            path = save_png(GeneratedImage(image, text, method, request.seed + i), args.out)
            written.append(path)
            if result.masks is not None:
                written += save_mask_pictures(result.masks[i], path.with_suffix(""))
    return written


def _refuse_experts_export(_argv: list[str]) -> None:
    raise CompositionError(
        "mole export folds a MoLE file (--mole); experts without gates export as: a weighted sum or NLA in one "
        "LoRA with `python -m moslora_diffusion.export --adapter A:1 --adapter B:1 --to lora-kohya`, a regional "
        "layout (which no single LoRA can hold) with `--to comfyui-workflow`")


def main(argv: list[str] | None = None) -> int:
    """`generate` here; `train` and `export` (and the usage line) from mole/cli.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from .export_cli import main as export_main
        from .export_cli import wants_workflow

        if wants_workflow(argv[1:]):
            return export_main(argv[1:])
        given = {a.split("=", 1)[0] for a in argv}
        if "--experts" in given and "--mole" not in given:
            return run_command(_refuse_experts_export, argv[1:])
    if not argv or argv[0] != "generate":
        return mole_cli.main(argv)
    parser = generate_parser()

    def body(args_list: list[str]) -> None:
        args = parser.parse_args(args_list)
        written = run_generate(args)
        print(f"wrote {len(written)} file{'s' if len(written) != 1 else ''} under {args.out}")

    return run_command(body, argv[1:])
