"""`python -m moslora_diffusion.mole export --to comfyui-workflow`: a regional composition for ComfyUI and A1111.

    python -m moslora_diffusion.mole export --to comfyui-workflow --base BASE --experts out/star out/square \\
        --region star=0,0,0.5,1 --region square=0.5,0,1,1 [--region_prompt star="a photo of sks star"] \\
        --prompt "sks star and v square" --seeds 7 --size 512 --out star+square-comfyui [--checkpoint NAME]

The same flags as `generate` (one prompt, one seed); export.py writes the folder. What a workflow cannot express
(automatic regions, MoLE gates, the whole-image methods) is refused in one line before the model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import run_command
from ..files.atomic import check_not_an_input, check_output_folder
from ..formats.export_targets import DTYPES
from ..generation.text_to_image import GenerationRequest, native_size, validate_command_request
from .cli import _check, _experts_before_loading, _image_size, _load, _method, generate_parser, regions_from
from .export import WORKFLOW_TARGET, check_export, check_workflow_out, export_workflow, refuse_unexpressible
from .regions import CompositionError


def export_parser() -> argparse.ArgumentParser:
    parser = generate_parser()
    parser.prog = "python -m moslora_diffusion.mole export --to comfyui-workflow"
    parser.description = ("Export a regional composition as a folder: the experts as kohya LoRAs, the masks as "
                          "PNGs, a ComfyUI API workflow and A1111 Regional Prompter text.")
    for action in parser._actions:  # generate's --out is a folder of PNGs; here it is the export's folder
        if action.dest == "out":
            action.help = "the export's folder (created; --overwrite replaces an earlier export of ours)"
    parser.add_argument("--to", required=True, choices=(WORKFLOW_TARGET,), dest="target")
    parser.add_argument("--checkpoint", default=None, help="the base checkpoint's file name in ComfyUI's "
                        "models/checkpoints (default: the --base file's name, else <base name>.safetensors)")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    return parser


def wants_workflow(argv: list[str]) -> bool:
    """`export ... --to comfyui-workflow` (either spelling) goes here; other targets stay mole/cli.py's."""
    return any(a == f"--to={WORKFLOW_TARGET}" or (a == "--to" and argv[i + 1:i + 2] == [WORKFLOW_TARGET])
               for i, a in enumerate(argv))


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in argv)


def checkpoint_name(base: str, given: str | None) -> str:
    if given:
        return given
    path = Path(str(base))
    return path.name if path.suffix == ".safetensors" else f"{path.name}.safetensors"


def run_export(args: argparse.Namespace) -> Path:
    regions = regions_from(args)
    method = _method(args, regions)
    refuse_unexpressible(method)  # first: its line says what to do instead
    if args.fit_steps is not None:  # before _check, whose advice (--blend latent) the workflow refuses too
        raise CompositionError("--fit_steps is not exported to a workflow: fitting needs the latent or inpaint "
                               "blend, which have no ComfyUI workflow; leave --fit_steps (and --blend) out to export")
    if len(args.prompt) != 1 or len(args.seeds) != 1:
        raise CompositionError("a workflow holds one image: give one --prompt and one --seeds value")
    names, prompts, stored = _experts_before_loading(args)
    given_size = _image_size(args, regions)
    _check(args, method, regions, names, prompts, given_size)
    if args.blend in ("latent", "inpaint"):  # it was dropped without a word
        raise CompositionError(f"--blend {args.blend} has no ComfyUI workflow: the workflow applies each LoRA "
                               "through its masked conditioning, as --blend attention does; leave --blend out to "
                               "export")
    if args.background:  # a workflow's masks are fixed pictures; the background is what the regions leave
        raise CompositionError("--background is not exported to a workflow: give that expert a --region_mask "
                               "(white where no other region is) instead, then export")
    size = given_size or 512
    request = validate_command_request(GenerationRequest(args.prompt[0], args.negative_prompt, args.seeds[0],
                                                         args.steps, args.guidance, size, size, scheduler=args.sampler))
    check_export(names, request, regions, method, args.dtype)
    out = check_output_folder(args.out, "--out", "the export is written to")
    check_not_an_input(out, [args.base, *args.experts, *([args.mole] if args.mole else [])], "--out")
    check_workflow_out(out, args.overwrite)
    pipe, experts = _load(args, stored, method)
    if not given_size:
        request.width = request.height = native_size(pipe, 512)  # what generate would draw
        check_export(names, request, regions, method, args.dtype)
    return export_workflow(pipe, experts, request, regions, out, checkpoint_name(args.base, args.checkpoint),
                           args.dtype, args.overwrite)


def main(argv: list[str]) -> int:
    parser = export_parser()

    def body(args_list: list[str]) -> None:
        # --mole alone means MoLE's own method, which no workflow expresses (with regions it is regional: exported)
        method_set = any(_given(args_list, flag) for flag in ("--method", "--region", "--region_mask"))
        if _given(args_list, "--mole") and not method_set:
            refuse_unexpressible("mole")  # before the parser asks for --prompt, which would not help
        print(f"wrote {run_export(parser.parse_args(args_list))}")

    return run_command(body, argv)
