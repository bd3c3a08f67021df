"""`python -m moslora_diffusion.evaluate`: the arguments, every check before the model loads, then generate what
is missing, score, and write report.{json,md} and contact_sheet.png into --out.

One adapter (or several, compared) on one subject: --photos DIR --prompt ... (or --prompts_file).
DreamBench: --dreambench DIR (subject folders + prompts_and_classes.txt); each --adapter then names a folder
holding one adapter per subject (<folder>/<subject>/ a training output folder, or <folder>/<subject>.safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checks import MAX_SEED, Range, number_problems
from ..checks.devices import check_device
from ..console import OneLineErrorParser, add_debug_flag
from ..files.atomic import atomic_write, check_free_space
from ..formats.merge import resolve_adapter_path
from ..generation.text_to_image import SCHEDULERS, validate_request
from .hf_scorers import DEFAULT_CLIP, DEFAULT_DINO
from .plan import EvaluationError, Subject, dreambench_subjects, read_prompts_file
from .run import Sampling, generate_missing, missing_jobs, score_plan
from .toy_scorer import size_problem

SETTINGS_FILE = "evaluation.json"  # what the images in --out were generated with: a resume must match it
RANGES = {"batch_size": Range(1, 1024, integer=True), "max_sheet_rows": Range(1, 1000, integer=True)}


def parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m moslora_diffusion.evaluate",
                           description="Subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T) of adapters, "
                           "as the DreamBooth paper measures them; or the toy checker's scores on the toy base.")
    p.add_argument("--base", required=True, help="hub id, diffusers folder or single .safetensors file")
    p.add_argument("--adapter", action="append", default=[], metavar="[LABEL=]PATH",
                   help="adapter to evaluate (repeat to compare); with --dreambench a folder of per-subject adapters")
    p.add_argument("--include_base", action="store_true", help="also evaluate the base model (label `base`)")
    p.add_argument("--photos", type=Path, help="the subject's real photos (one-subject mode)")
    p.add_argument("--prompt", action="append", default=[], help="prompt with the unique token (repeatable)")
    p.add_argument("--prompts_file", type=Path, help="prompts, one per line")
    p.add_argument("--dreambench", type=Path, help="DreamBench folder: subject folders + prompts_and_classes.txt")
    p.add_argument("--subjects", nargs="+", help="with --dreambench: only these subjects")
    p.add_argument("--token", default="sks", help="the unique token (dropped from the CLIP-T prompt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="one image per seed and prompt (DreamBench: 4)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale")
    p.add_argument("--size", type=int, default=None, help="width and height (default: the model's own)")
    p.add_argument("--sampler", default="DPM++ 2M", choices=tuple(SCHEDULERS), metavar="NAME",
                   help=f"one of: {', '.join(SCHEDULERS)}")
    p.add_argument("--negative_prompt", default="", help="what the images should not show")
    p.add_argument("--metrics", choices=("dreambench", "toy"), default="dreambench",
                   help="dreambench: DINO, CLIP-I, CLIP-T; toy: the toy checker (subject shown, prompt followed)")
    p.add_argument("--dino_model", default=DEFAULT_DINO, help="hub id or local folder (safetensors)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP, help="hub id or local folder (safetensors)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch_size", type=int, default=16, help="images per scorer forward pass")
    p.add_argument("--max_sheet_rows", type=int, default=30, help="(subject, prompt) rows in contact_sheet.png")
    p.add_argument("--config", default=None, help="diffusers folder with the configs of a single-file base")
    p.add_argument("--out", type=Path, required=True, help="folder for images and report (reused to resume)")
    add_debug_flag(p)
    return p


def _adapter_specs(args) -> dict[str, Path | None]:
    specs: dict[str, Path | None] = {"base": None} if args.include_base else {}
    for text in args.adapter:
        label, sep, path = text.partition("=")
        label, path = (label, Path(path)) if sep and not Path(text).exists() else (Path(text).stem, Path(text))
        if not label or label in specs:
            raise EvaluationError(f"--adapter {text!r}: label {label!r} is empty or used twice; write LABEL=PATH")
        specs[label] = path
    if not specs:
        raise EvaluationError("nothing to evaluate: give --adapter PATH (repeat to compare) or --include_base")
    return specs


def _per_subject(folder: Path, subject: str) -> Path:
    for candidate in (folder / subject, folder / f"{subject}.safetensors"):
        if candidate.exists():
            return resolve_adapter_path(candidate)
    raise EvaluationError(f"--adapter {folder}: no adapter for subject {subject!r} ({folder / subject}/ or "
                          f"{folder / subject}.safetensors)")


def subjects_from(args) -> list[Subject]:
    """The subjects with their prompts and adapters, every path checked (EvaluationError / AdapterError); notes on
    their reference photos (skipped files, very small ones) are printed to stderr."""
    specs = _adapter_specs(args)
    if (args.dreambench is None) == (args.photos is None):
        raise EvaluationError("give either --photos (one subject) or --dreambench (a DreamBench folder)")
    if args.dreambench is not None:
        if args.prompt or args.prompts_file:
            raise EvaluationError("--dreambench takes its prompts from prompts_and_classes.txt: drop --prompt / "
                                  "--prompts_file")
        subjects = dreambench_subjects(args.dreambench, args.token, args.subjects)
        for s in subjects:
            s.adapters = {label: None if path is None else _per_subject(path, s.name) for label, path in specs.items()}
    else:
        prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise EvaluationError("give the prompts: --prompt TEXT (repeatable) or --prompts_file FILE")
        adapters = {label: None if path is None else resolve_adapter_path(path) for label, path in specs.items()}
        subjects = [Subject(args.photos.name or "subject", args.photos, list(dict.fromkeys(prompts)),
                            adapters=adapters)]
    notes = []
    for s in subjects:
        if not Path(s.photos).is_dir():
            raise EvaluationError(f"--photos {s.photos}: not a folder of photos")
        notes += s.check_references()  # at least one readable photo, before the model loads
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return subjects


def check_numbers(args) -> None:
    problems = number_problems(vars(args), RANGES, "--{}")
    problems += [f"--seeds: {seed} is not between 0 and {MAX_SEED}" for seed in args.seeds if not 0 <= seed <= MAX_SEED]
    problems += [p for p in [_toy_size_problem(args, args.size)] if p]
    if problems:
        raise EvaluationError("; ".join(problems))
    validate_request(Sampling(args.steps, args.guidance, args.size or 512, args.sampler).request("x", 0, {}))
    check_device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise EvaluationError(f"--out {args.out} is a file; --out names the folder for the images and the report")
    check_free_space(args.out, 0)  # the margin at least, before the model loads; each image is checked again


def _toy_size_problem(args, size: int | None) -> str | None:
    return size_problem(size, "--size") if args.metrics == "toy" else None


def check_resume(out: Path, settings: dict) -> None:
    """Refuses to mix images generated with other settings into one report."""
    try:
        before = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    # a size not given (None) is the model's own, which the same base gives again
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if v is not None and before.get(k) != v]
    if changed:
        raise EvaluationError(f"--out {out} holds images generated with other settings ({'; '.join(changed)}); "
                              "choose another --out, or the same settings to resume")


def write_settings(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=1) + "\n"
    atomic_write(out / SETTINGS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def generation_settings(args, size: int | None) -> dict:
    return {"base": str(args.base), "steps": args.steps, "guidance": args.guidance, "size": size,
            "sampler": args.sampler, "negative_prompt": args.negative_prompt}


def sampling(args, size: int) -> Sampling:
    return Sampling(args.steps, args.guidance, size, args.sampler, args.negative_prompt)


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_pipeline(args, device: str):
    import torch

    from ..models.loading import load_pipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.base, torch_dtype=dtype, config=args.config).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _metrics(args, device: str) -> list:
    from .hf_scorers import ClipScorer, DinoScorer
    from .metrics import dreambench_metrics, toy_metrics
    from .toy_scorer import ToyScorer

    if args.metrics == "toy":
        return toy_metrics(ToyScorer(args.batch_size, args.token))
    return dreambench_metrics(DinoScorer(args.dino_model, device, args.batch_size),
                              ClipScorer(args.clip_model, device, args.batch_size))


def run(args) -> dict:
    """Checks everything, generates the missing images, scores them, writes the report; returns
    {"generated": n, "summary": ..., "files": [...]}."""
    from .report import contact_sheet, write_report

    check_numbers(args)
    subjects = subjects_from(args)
    settings = generation_settings(args, args.size)
    check_resume(args.out, settings)
    if args.metrics == "dreambench":  # a pickle-only model folder is refused before anything is generated
        from .hf_scorers import checked_source

        checked_source(args.dino_model, "ViTModel")
        checked_source(args.clip_model, "CLIPModel")
    images_dir, device, generated = args.out / "images", _device(args), 0
    if missing_jobs(subjects, args.seeds, images_dir):
        from ..generation.text_to_image import native_size

        pipe = _load_pipeline(args, device)
        settings["size"] = args.size or native_size(pipe, 512)
        if _toy_size_problem(args, settings["size"]):  # the model's own size, known now: before any image
            raise EvaluationError(_toy_size_problem(args, settings["size"]))
        write_settings(args.out, settings)
        model_name = Path(args.base).name if Path(args.base).exists() else str(args.base)
        generated = generate_missing(pipe, subjects, args.seeds, images_dir, sampling(args, settings["size"]),
                                     model_name)
        del pipe
    metrics = _metrics(args, device)
    rows = score_plan(subjects, args.seeds, images_dir, metrics, args.token)
    names = [m.name for m in metrics]
    report = {**json.loads((args.out / SETTINGS_FILE).read_text(encoding="utf-8")), "seeds": args.seeds,
              "metrics": args.metrics, "references": {s.name: s.references() for s in subjects}}
    if args.metrics == "dreambench":
        report.update(dino_model=str(args.dino_model), clip_model=str(args.clip_model))
    summary = write_report(args.out, rows, names, args.token, report)
    sheet = contact_sheet(rows, images_dir, args.out / "contact_sheet.png", max_rows=args.max_sheet_rows)
    return {"generated": generated, "scored": len(rows), "summary": summary,
            "files": [args.out / "report.json", args.out / "report.md", sheet]}


