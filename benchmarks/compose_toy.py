"""Composition in one image on the toy world: every `compose` method, each expert alone and the base model,
measured per subject (moslora_diffusion/toy/composition_check.py).

The three experts of benchmarks/mole_toy.py (the same recipe and trainer: `sks` the striped star, `v` the
checkered square, `z` the zigzag background) are DreamBooth-trained once on the base (default
assets/toy-base-2obj, which draws two-object captions). Per benchmark seed, MoLE's gates and the spatial
gates (the gate trainer's spatial_gates) are trained for each expert set the cases use, with that seed; then every
method draws every case of both splits (compose_toy_cases.py) with the same generation seeds:

- `sum`, `nla`, `mole`, `switch`, `composite`: the whole-image methods; `regional`: the cases' places as
  boxes (the zigzag expert: compose's `background`, wherever the box leaves room), with or without each region's
  own prompt, the attention or the latent blend, the latent blend fitted after 3 or 6 of the 20 steps, and the
  inpaint blend (one region after another over the picture so far) fitted after 3 or 6 steps;
  `auto`: masks from the trigger words' cross-attention; `spatial_mole`: per-position gates;
- `base`: the base model; `alone`: the named subject's expert alone (one-subject cases: the ceiling).

Settings (regional's region prompts, switch's steps per expert) are chosen on the validation split by its
mean joint success over the two-concept cases, and so is the best spatial method; the test split is
reported (every setting is drawn on both splits, so the splits can run as parallel parts; the test rows of
the settings not chosen are dropped). Means over seeds with 95% t intervals; paired t-tests over seeds.

    python -m benchmarks.compose_toy --threads 1        # -> benchmarks/results/compose_toy.md, .json, _grid.png
    python -m benchmarks.compose_toy --experts-only                                        # once, then two
    python -m benchmarks.compose_toy --splits validation --name part_v --out-dir outputs   # processes in
    python -m benchmarks.compose_toy --splits test --name part_t --out-dir outputs         # parallel (slots),
    python -m benchmarks.compose_toy --merge outputs/part_v.json outputs/part_t.json       # then merged
    python -m benchmarks.compose_toy --kinds one --methods regional --name part_o ...      # a part: some kinds
    python -m benchmarks.compose_toy --seeds 2 --val-seeds 1 --expert-steps 20 --background-steps 20 \\
        --gate-steps 4 --n-images 2 --gen-steps 4 --base assets/toy-base --out-dir /tmp/c    # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.compose_toy_cases import BACKGROUND, KINDS, SPLITS, Case
from benchmarks.compose_toy_report import grid_rows, report, seed_metrics
from benchmarks.mole_toy import add_shared_flags, train_experts, train_gates
from benchmarks.quality import load_pipe
from benchmarks.quality_report import save_grid

REPO = Path(__file__).resolve().parents[1]
TRIGGERS = ("sks", "v", BACKGROUND)  # mole_toy.concepts() order: subject, subject2, background
SETTINGS = {"regional": [{"region_prompts": False}, {"region_prompts": True},
                         {"region_prompts": True, "blend": "latent"},
                         {"region_prompts": True, "blend": "latent", "fit_steps": 3},
                         {"region_prompts": True, "blend": "latent", "fit_steps": 6},
                         {"region_prompts": True, "blend": "inpaint", "fit_steps": 3},
                         {"region_prompts": True, "blend": "inpaint", "fit_steps": 6}],
            "switch": [{"every": 2}, {"every": 5}]}
GEN_SEEDS = {"validation": 2000, "test": 3000}


def setting_label(method: str, setting: dict) -> str:
    """A row's method label: "regional region_prompts=True", "switch every=2", "mole"."""
    return method + "".join(f" {k}={v}" for k, v in setting.items())


def gate_states(args, paths: dict[str, Path], seed: int, tag: str = "") -> dict[tuple, dict]:
    """{(expert set, "mole" | "spatial_mole"): gate_state} for every expert set of the cases and each of the two
    methods in --methods (spatial: the gate trainer's --spatial_gates). `tag` names the run folders (parallel
    parts must not share them)."""
    from moslora_diffusion.mole.file import read_mole

    kinds = [k for k in ("mole", "spatial_mole") if k in args.methods]
    states = {}
    for names in sorted({case.experts for cases in SPLITS.values() for case in cases}):
        which = tuple(TRIGGERS.index(n) for n in names)
        experts = [paths[n] for n in names]
        label = "gates-" + "-".join(names) + (f"-{tag}" if tag else "")
        for kind in kinds:
            extra = {"spatial_gates": True} if kind == "spatial_mole" else {}
            suffix = "-spatial" if kind == "spatial_mole" else ""
            states[(names, kind)] = read_mole(train_gates(args, experts, seed, args.work_dir, which, label + suffix,
                                                          **extra)).gates
    return states


def regions_for(case: Case, setting: dict):
    from moslora_diffusion.composition import Region

    return [Region(spec["expert"], box=spec["box"], prompt=spec["prompt"])
            for spec in case.region_specs(setting.get("region_prompts", False))]


def run_method(pipe, experts, method: str, case: Case, req, setting: dict, gates) -> tuple[list, list | None]:
    """(images, masks) of one method on one case; auto gets the trigger words of the concepts the prompt names."""
    from moslora_diffusion.composition import compose

    named = {c for c, _ in case.places} | ({BACKGROUND} if case.zigzag else set())
    if method == "regional":
        options = {k: v for k, v in setting.items() if k != "region_prompts"}
        if case.background:
            options["background"] = case.background
        if all(place == "any" for _, place in case.places):  # whole-image regions are never fitted (compose
            options.pop("fit_steps", None)  # refuses fit_steps there): the setting is its unfitted blend
        result = compose(pipe, experts, method, req, regions=regions_for(case, setting), **options)
    elif method == "auto":
        result = compose(pipe, experts, method, req, triggers={e.name: e.name for e in experts if e.name in named})
    elif method in ("mole", "spatial_mole"):
        result = compose(pipe, experts, method, req, gates=gates)
    else:
        result = compose(pipe, experts, method, req, **setting)
    return result.images, result.masks


def draw_case(pipe, experts, case: Case, req, methods, states: dict, settings: dict) -> dict:
    """{row label: (images, masks)} for one case: each method (each setting on validation), base, alone."""
    from moslora_diffusion.composition import compose
    from moslora_diffusion.generation.text_to_image import make_scheduler, run_pipeline, validate_request
    from moslora_diffusion.mole import MoLEError

    drawn = {}
    for method in methods:
        for setting in settings.get(method, [{}]):
            label = setting_label(method, setting)
            gates = states.get((case.experts, method))
            if method == "spatial_mole" and gates is None:
                continue
            try:
                drawn[label] = run_method(pipe, experts, method, case, req, setting, gates)
            except (MoLEError, ImportError) as err:  # a method this build lacks: missing, not zeros
                print(f"skipped {label}: {err}", flush=True)
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    drawn["base"] = (run_pipeline(pipe, validate_request(req, []), None), None)
    if case.kind == "one":
        named = [e for e in experts if e.name == case.places[0][0]]
        drawn["alone"] = (compose(pipe, named, "sum", req).images, None)
    return drawn


def evaluate(args, pipe, paths: dict, split: str, seed: int, states: dict, settings: dict) -> tuple[list, dict]:
    """Per-case metric rows of one split and seed, and the images (for the grid)."""
    from moslora_diffusion.generation.text_to_image import GenerationRequest, scheduler_label
    from moslora_diffusion.mole import load_experts

    rows, images = [], {}
    for case in (c for c in SPLITS[split] if c.kind in args.kinds):
        experts = load_experts(pipe, [paths[n] for n in case.experts], names=list(case.experts))
        req = GenerationRequest(case.prompt, seed=GEN_SEEDS[split] + 100 * seed, steps=args.gen_steps,
                                guidance=args.guidance, width=64, height=64, num_images=args.n_images,
                                scheduler=scheduler_label(pipe.scheduler))
        drawn = draw_case(pipe, experts, case, req, args.methods, states, settings)
        for label, (imgs, _) in drawn.items():
            rows.append({"kind": "case", "split": split, "seed": seed, "case": case.name, "case_kind": case.kind,
                         "method": label, **seed_metrics(case, imgs)})
        images[case.name] = drawn
    return rows, images


def choose(runs: list[dict]) -> dict:
    """Per method, the setting with the best validation joint success over pair and zigzag cases."""
    chosen = {}
    for method, options in SETTINGS.items():
        def score(setting, method=method):
            label = setting_label(method, setting)
            vals = [r["joint"] for r in runs if r["split"] == "validation" and r["method"] == label
                    and r["case_kind"] in ("pair", "zigzag")]
            return float(np.mean(vals)) if vals else -1.0
        chosen[method] = [max(options, key=score)]
    return chosen


def parse_args(argv=None):
    from moslora_diffusion.composition import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base-2obj")
    parser.add_argument("--seeds", type=int, default=5, help="test-split seeds (gates and generation)")
    parser.add_argument("--val-seeds", type=int, default=3, help="validation-split seeds (the first of --seeds)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_shared_flags(parser, "compose_toy")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS),
                        help="draw only these splits (a part, written as <name>.json; merge the parts with --merge)")
    parser.add_argument("--experts-only", action="store_true",
                        help="train the experts into --work-dir and stop (before parallel parts, which share them)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS),
                        help="draw only these case kinds (a part, as --splits)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="report from parts' json files instead of drawing")
    args = parser.parse_args(argv)
    if args.merge:
        return args
    if not (args.base / "model_index.json").is_file():
        parser.error(f"--base {args.base}: not a diffusers model folder (no model_index.json)")
    if not 1 <= args.val_seeds <= args.seeds:
        parser.error("--val-seeds must lie in 1..--seeds")
    return args


def draw_parts(args, started: float) -> tuple[list[dict], Path | None]:
    """Every case row of the splits asked for (every setting of SETTINGS on both splits: the choice reads only
    validation rows, so the splits can run in parallel processes) and the test grid, if test was drawn."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(TRIGGERS, train_experts(args, args.work_dir), strict=True))
    pipe = load_pipe(args.base)
    runs, grid_path = [], None
    seeds = {"validation": args.val_seeds, "test": args.seeds}
    for seed in range(max(seeds[s] for s in args.splits)):
        states = gate_states(args, paths, seed, tag="+".join(args.splits))
        for split in args.splits:
            if seed >= seeds[split]:
                continue
            rows, images = evaluate(args, pipe, paths, split, seed, states, SETTINGS)
            runs += rows
            print(json.dumps(rows[-1]), flush=True)
            if split == "test" and seed == 0 and set(args.kinds) == set(KINDS):
                grid_path = save_grid(args.out_dir / f"{args.name}_grid.png", *grid_rows(images, SPLITS["test"]))
    print(f"drew {len(runs)} case rows in {time.perf_counter() - started:.0f} s", flush=True)
    return runs, grid_path


def plain_settings(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "merge"}


def finish(args, runs: list[dict], grid_name: str, started: float, parts_settings: list | None = None) -> dict:
    """Chooses the settings on validation, keeps the chosen ones' test rows, writes the report."""
    chosen = choose(runs)
    unchosen = {setting_label(m, s) for m, opts in SETTINGS.items() for s in opts if s not in chosen[m]}
    runs = [r for r in runs if r["split"] == "validation" or r["method"] not in unchosen]
    table, summary = report(runs, chosen)
    settings = parts_settings or plain_settings(args)
    notes = (__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2] + "\n\nSettings: " + json.dumps(settings)
             + f". Chosen on validation: {json.dumps(chosen)}. Wall time {time.perf_counter() - started:.0f} s. "
             f"Grid: `{grid_name}` (test split, seed 0, every setting; per case its first image and the mask "
             "picture of the regions the method used: red = first expert, green = second, gray = whole image).")
    write_results(args.name, runs + summary, table, notes, args.out_dir)
    return {"runs": runs, "summary": summary, "chosen": chosen}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(path.read_text())["rows"]]
        return finish(args, [r for r in rows if r.get("kind") == "case"], f"{args.name}_grid.png", started,
                      [r for r in rows if r.get("kind") == "settings"])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.experts_only:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return {"experts": [str(p) for p in train_experts(args, args.work_dir)]}
    runs, grid_path = draw_parts(args, started)
    if set(args.splits) == set(SPLITS) and set(args.kinds) == set(KINDS):
        return finish(args, runs, grid_path.name if grid_path else "-", started)
    note = f"A part ({', '.join(args.splits)}) of the composition benchmark: merge the parts with --merge."
    write_results(args.name, runs + [{"kind": "settings", **plain_settings(args)}], note, "", args.out_dir)
    return {"runs": runs}


if __name__ == "__main__":
    main()
