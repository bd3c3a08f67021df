"""Composing toy concepts (issue: MoLE benchmark): plain sum vs NLA vs MoLE (dynamic gates) vs MoLE static export.

Three experts are DreamBooth-trained once on the toy base (assets/toy-base) with the demo's recipe
(benchmarks/quality.py DEFAULTS; prior preservation with each concept's class prompt): the first subject
("sks star", yellow-and-black stripes), the second subject ("v square", red-and-white checkerboard) and a
background concept ("z background", a blue-and-green zigzag learned from ordinary objects on it; the toy world
and its checker: moslora_diffusion/toy/subject.py, concepts.py, patterns.py). Then, per benchmark seed, MoLE's
gates are trained (`mole train`, that seed) and every method draws the same prompts with the same generation
seeds:

- sum: the three LoRAs added at scale 1 (diffusers `set_adapters`, an A1111 / ComfyUI LoRA stack);
- nla: scales summing to 1 (1/3 each), the paper's normalised baseline;
- mole: the learned gates, dynamic (per sample, per block);
- mole_static: the gates averaged per block over the experts' prompts and folded into one LoRA (the export).

Metrics (shares of images, from pixels): routing: a prompt naming one subject must show it (`subject_rate`,
`subject2_rate`) and not the other's pattern (`subject_bleed`, `subject2_bleed`); the background prompt shows
the zigzag (`background_rate`) and the subject prompts do not (`background_leak`); composition: a subject on the
zigzag shows both (`both_rate`, mean of the two subjects). `static_gap`: relative L2 between the dynamic and the
static model's final latents. Means over seeds with 95% t intervals; MoLE vs NLA and vs sum, and static vs
dynamic, as paired t-tests over seeds.

    python -m benchmarks.mole_toy --threads 2            # -> benchmarks/results/mole_toy.md, .json, _grid.png
    python -m benchmarks.mole_toy --seeds 2 --expert-steps 20 --gate-steps 4 --n-images 2 --gen-steps 4 \\
        --out-dir /tmp/m                                 # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.quality import DEFAULTS, load_pipe
from benchmarks.quality_report import save_grid
from moslora_diffusion.evaluation.stats import mean_ci, paired_test

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sum", "nla", "mole", "mole_static")
METRICS = (  # name, what, better
    ("subject_rate", "'sks star' images showing the striped subject", "higher"),
    ("subject_bleed", "'sks star' images whose object carries the checkerboard", "lower"),
    ("subject2_rate", "'v square' images showing the checkered subject", "higher"),
    ("subject2_bleed", "'v square' images whose object carries the stripes", "lower"),
    ("background_rate", "'a red star, on a z background' images showing the zigzag", "higher"),
    ("background_leak", "subject-prompt images (no background named) showing the zigzag", "lower"),
    ("both_rate", "'sks star / v square, on a z background' images showing subject and zigzag", "higher"),
)
COMPARISONS = (("mole", "nla"), ("mole", "sum"), ("mole_static", "mole"))


def concepts():
    """(name, photo folder, instance prompt, class prompt) of the three experts."""
    from moslora_diffusion.toy.concepts import BACKGROUND
    from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2

    return [("subject", REPO / "assets" / SUBJECT.folder, SUBJECT.instance_prompt, SUBJECT.class_prompt),
            ("subject2", REPO / "assets" / SUBJECT_2.folder, SUBJECT_2.instance_prompt, SUBJECT_2.class_prompt),
            ("background", REPO / "assets" / BACKGROUND.folder, BACKGROUND.prompt("a star"), BACKGROUND.class_prompt)]


def prompts() -> dict[str, str]:
    from moslora_diffusion.toy.concepts import BACKGROUND
    from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2

    return {"subject": SUBJECT.instance_prompt, "subject2": SUBJECT_2.instance_prompt,
            "background": BACKGROUND.prompt("a red star"),
            "subject_on_background": BACKGROUND.prompt(f"{SUBJECT.token} {SUBJECT.class_noun}"),
            "subject2_on_background": BACKGROUND.prompt(f"{SUBJECT_2.token} {SUBJECT_2.class_noun}")}


def _fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_experts(args, work: Path) -> list[Path]:
    """The three DreamBooth experts (cached in the work folder: a rerun reuses them)."""
    from moslora_diffusion.training import TrainConfig, train

    paths = []
    for name, photos, prompt, class_prompt in concepts():
        out = work / f"expert-{name}"
        steps = args.background_steps if name == "background" else args.expert_steps
        if not (out / "moslora.safetensors").is_file():
            config = TrainConfig(
                pretrained_model_name_or_path=str(args.base), instance_data_dir=str(photos), instance_prompt=prompt,
                with_prior_preservation=True, class_prompt=class_prompt, class_data_dir=str(work / f"class-{name}"),
                num_class_images=DEFAULTS["num_class_images"], prior_loss_weight=DEFAULTS["prior_loss_weight"],
                resolution=64, rank=DEFAULTS["rank"], target_modules=DEFAULTS["target_modules"],
                train_text_encoder=DEFAULTS["train_text_encoder"], learning_rate=DEFAULTS["learning_rate"],
                lr_scheduler="constant_with_warmup", lr_warmup_steps=min(20, steps // 5),
                train_batch_size=DEFAULTS["batch"], max_train_steps=steps, seed=0, output_dir=str(out),
                overwrite_output_dir=True, report_to="none", checkpointing_steps=10**9, logging_steps=50)
            _fresh_accelerate()
            train(config)
            _fresh_accelerate()
        paths.append(out / "moslora.safetensors")
    return paths


def train_gates(args, experts: list[Path], seed: int, work: Path, which: tuple[int, ...] | None = None,
                label: str = "gates", **extra) -> Path:
    """MoLE gates for `experts` (the concepts() at indices `which`; None: all) with this seed; `extra`: more
    GateTrainConfig fields (e.g. the spatial gates' switch). Returns the MoLE file."""
    from moslora_diffusion.mole.gate_config import GateTrainConfig
    from moslora_diffusion.mole.gate_training import train_gates as run

    chosen = [concepts()[i] for i in (which if which is not None else range(len(experts)))]
    out = work / f"{label}-seed{seed}"
    config = GateTrainConfig(
        pretrained_model_name_or_path=str(args.base), experts=tuple(map(str, experts)),
        expert_data_dirs=tuple(str(photos) for _, photos, _, _ in chosen),
        expert_prompts=tuple(prompt for _, _, prompt, _ in chosen), resolution=64,
        train_batch_size=args.gate_batch, max_train_steps=args.gate_steps, learning_rate=args.gate_lr,
        balance_weight=args.balance_weight, seed=seed, output_dir=str(out), overwrite_output_dir=True,
        report_to="none", checkpointing_steps=10**9, logging_steps=50, **extra)
    _fresh_accelerate()
    try:
        return run(config).files["mole"]
    finally:
        _fresh_accelerate()


def draw(pipe, args, seed: int) -> dict[str, list]:
    """n images per prompt; the same generation seed for every method of a benchmark seed."""
    from moslora_diffusion.toy.evaluate import generate

    return {key: generate(pipe, [text] * args.n_images, seed=1000 + seed, steps=args.gen_steps,
                          guidance=args.guidance) for key, text in prompts().items()}


def metrics(images: dict[str, list]) -> dict[str, float]:
    from moslora_diffusion.toy.concepts import BACKGROUND
    from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2

    def share(test, key):
        return float(np.mean([test(im) for im in images[key]]))

    both = [share(lambda im, s=s: s.shown(im) and BACKGROUND.shown(im), key)
            for s, key in ((SUBJECT, "subject_on_background"), (SUBJECT_2, "subject2_on_background"))]
    return {"subject_rate": share(SUBJECT.shown, "subject"), "subject_bleed": share(SUBJECT_2.shown, "subject"),
            "subject2_rate": share(SUBJECT_2.shown, "subject2"), "subject2_bleed": share(SUBJECT.shown, "subject2"),
            "background_rate": share(BACKGROUND.shown, "background"),
            "background_leak": float(np.mean([BACKGROUND.shown(im) for k in ("subject", "subject2")
                                              for im in images[k]])),
            "both_rate": float(np.mean(both))}


def evaluate_seed(args, pipe, experts: list[Path], mole_path: Path, seed: int) -> tuple[list[dict], dict]:
    """Every method's metrics for one seed (and its images, for the grid)."""
    from moslora_diffusion.generation.fusion import FusedAdapters
    from moslora_diffusion.mole import average_gates, detach_mole, load_mole, static_fold, static_gap
    from moslora_diffusion.moslora.folded import FoldedAdapter

    fusion = FusedAdapters(pipe)
    names = [f"expert{i}" for i in range(len(experts))]
    for name, path in zip(names, experts, strict=True):
        fusion.add(name, path, scale=0.0)
    drawn = {}
    for method, scale in (("sum", 1.0), ("nla", 1.0 / len(experts))):
        fusion.set_scales(dict.fromkeys(names, scale))
        drawn[method] = draw(pipe, args, seed)
    fusion.set_scales(dict.fromkeys(names, 0.0))  # the base weights, bit for bit: MoLE's hooks go on top
    mole = load_mole(pipe, mole_path)
    drawn["mole"] = draw(pipe, args, seed)
    weights = average_gates(pipe, [p for _, _, p, _ in concepts()], seeds=(0, 1))
    gap = static_gap(pipe, weights, list(prompts().values()), seed=seed, steps=args.gen_steps)
    folded = static_fold(mole, weights)
    detach_mole(pipe)
    layers = {(c, m): lora for c, modules in folded.items() for m, lora in modules.items()}
    fusion.add_folded(FoldedAdapter("mole_static", None, layers), scale=1.0)
    drawn["mole_static"] = draw(pipe, args, seed)
    for name in [*names, "mole_static"]:
        fusion.remove(name)
    rows = [{"kind": "run", "method": m, "seed": seed, **metrics(drawn[m])} for m in METHODS]
    rows[-1]["static_gap_latents"] = gap["latents_rel_l2"]
    rows[-1]["static_gap_unet"] = gap["unet_output_rel_l2"]
    return rows, drawn


def summarise(runs: list[dict]) -> tuple[dict, dict]:
    summary = {m: {k: mean_ci([r[k] for r in runs if r["method"] == m], bounds=(0.0, 1.0)) for k, _, _ in METRICS}
               for m in METHODS}
    comparisons = {}
    for a, b in COMPARISONS:
        first = sorted((r for r in runs if r["method"] == a), key=lambda r: r["seed"])
        second = sorted((r for r in runs if r["method"] == b), key=lambda r: r["seed"])
        comparisons[f"{a}_vs_{b}"] = {k: paired_test([r[k] for r in first], [r[k] for r in second])
                                      for k, _, _ in METRICS}
    return summary, comparisons


def table(summary: dict, comparisons: dict, runs: list[dict]) -> str:
    def cell(s):
        return f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"

    lines = ["| metric | better | " + " | ".join(METHODS) + " |", "|---|---|" + "---:|" * len(METHODS)]
    lines += [f"| {k} | {better} | " + " | ".join(cell(summary[m][k]) for m in METHODS) + " |"
              for k, _, better in METRICS]
    lines += ["", "Paired differences over seeds (95% CI, two-sided paired t-test):", "",
              "| metric | " + " | ".join(comparisons) + " |", "|---|" + "---|" * len(comparisons)]
    for k, _, _ in METRICS:
        cells = []
        for c in comparisons.values():
            p = "n/a" if c[k]["p"] is None else f"{c[k]['p']:.3f}"
            cells.append(f"{c[k]['diff']:+.2f} [{c[k]['ci_low']:+.2f}, {c[k]['ci_high']:+.2f}], p={p}"
                         + (" **significant**" if c[k]["significant"] else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    gaps = [r["static_gap_latents"] for r in runs if "static_gap_latents" in r]
    unet = [r["static_gap_unet"] for r in runs if "static_gap_unet" in r]
    lines += ["", f"Static export vs dynamic gates, relative L2 (mean over seeds): final latents {np.mean(gaps):.3f}, "
              f"first UNet output {np.mean(unet):.4f}."]
    return "\n".join(lines)


def add_shared_flags(parser, name: str) -> None:
    """The flags the toy composition benchmarks share (this one and compose_toy.py): expert and gate training,
    generation, where things go."""
    parser.add_argument("--expert-steps", type=int, default=DEFAULTS["steps"], help="DreamBooth steps per subject")
    parser.add_argument("--background-steps", type=int, default=400, help="DreamBooth steps of the background")
    parser.add_argument("--gate-steps", type=int, default=150)
    parser.add_argument("--gate-lr", type=float, default=1e-2)
    parser.add_argument("--gate-batch", type=int, default=4)
    parser.add_argument("--balance-weight", type=float, default=0.5)
    parser.add_argument("--n-images", type=int, default=8, help="images per prompt, method and seed")
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / f"{name.replace('_', '-')}-bench",
                        help="experts and gates (kept: a rerun reuses the experts)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=name)
    parser.add_argument("--threads", type=int, default=None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base")
    parser.add_argument("--seeds", type=int, default=5, help="benchmark seeds: gate training and generation")
    add_shared_flags(parser, "mole_toy")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    experts = train_experts(args, args.work_dir)
    pipe = load_pipe(args.base)
    runs, grid_rows = [], []
    for seed in range(args.seeds):
        gates = train_gates(args, experts, seed, args.work_dir)
        rows, drawn = evaluate_seed(args, pipe, experts, gates, seed)
        runs += rows
        print(json.dumps(rows), flush=True)
        if seed == 0:
            grid_rows = [(m, [im for key in prompts() for im in drawn[m][key][:2]]) for m in METHODS]
    grid = save_grid(args.out_dir / f"{args.name}_grid.png", grid_rows,
                     [text.replace("a photo of ", "") for text in prompts().values() for _ in range(2)])
    summary, comparisons = summarise(runs)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    notes = (__doc__.split("\n\n")[1] + "\n\nSettings: " + json.dumps(settings) +
             f". Wall time {time.perf_counter() - started:.0f} s. Grid: `{grid.name}` (rows: methods, seed 0; "
             "columns: each prompt twice).\n\n" + "\n".join(f"- `{k}` ({b} is better): {w}" for k, w, b in METRICS))
    rows = runs + [{"kind": "summary", "method": m, **s} for m, s in summary.items()]
    rows += [{"kind": "comparison", "comparison": c, **t} for c, t in comparisons.items()]
    write_results(args.name, rows, table(summary, comparisons, runs), notes, args.out_dir)
    return {"runs": runs, "summary": summary, "comparisons": comparisons, "grid": str(grid)}


if __name__ == "__main__":
    main()
