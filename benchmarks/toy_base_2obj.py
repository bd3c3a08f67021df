"""The two-objects pretraining stage, measured: the continued toy base vs the one it continued.

Per seed and base model, generations from captions of held-out (class, colour, background) combinations,
read from pixels (moslora_diffusion/toy/evaluate.py):

- two-object captions ("a photo of a red star on the left and a blue circle on the right, on a green
  background", pairs.py): `pair_success` (both objects found, each with its caption's class and colour in its
  place; pair_checker.py), `two_objects_found`, per-object class and colour accuracy;
- one-object captions (world.py): every attribute's accuracy, as the toy base was measured when it shipped.

Means over seeds with 95% t intervals; new vs old as paired t-tests over seeds (same captions and noise).

    python -m benchmarks.toy_base_2obj --threads 1     # -> benchmarks/results/toy_base_2obj.md, .json, _grid.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.quality import load_pipe
from moslora_diffusion.evaluation.stats import mean_ci, paired_test

REPO = Path(__file__).resolve().parents[1]
PAIR_METRICS = ("pair_success", "two_objects_found", "pair_cls_accuracy", "pair_colour_accuracy")
ONE_METRICS = ("object_found", "cls_accuracy", "colour_accuracy", "size_accuracy", "position_accuracy",
               "background_accuracy")


def measure(pipe, args, seed: int) -> dict:
    from moslora_diffusion.toy.evaluate import evaluate_base, evaluate_pairs

    pairs = evaluate_pairs(pipe, args.n, seed, args.gen_steps, args.guidance, "heldout")
    one = evaluate_base(pipe, args.n, seed, args.gen_steps, args.guidance, "heldout")
    return {k: pairs[k] for k in PAIR_METRICS} | {k: one[k] for k in ONE_METRICS}


def pair_grid(pipes: dict, path: Path, n: int = 6, per: int = 3, seed: int = 0) -> Path:
    """Rows: a held-out two-object caption; columns: the world's render, then `per` images of each base."""
    from benchmarks.quality_report import save_grid
    from moslora_diffusion.toy.evaluate import generate
    from moslora_diffusion.toy.pairs import pair_caption, render_pair, sample_pair

    rng = np.random.default_rng(seed + 77)
    pairs = [sample_pair(rng, split="heldout") for _ in range(n)]
    drawn = {name: generate(pipe, [pair_caption(p) for p in pairs for _ in range(per)], seed, 25, 5.0)
             for name, pipe in pipes.items()}
    rows = [(pair_caption(p).replace("a photo of ", "")[:20], [render_pair(p)]
             + [im for name in pipes for im in drawn[name][i * per:(i + 1) * per]]) for i, p in enumerate(pairs)]
    columns = ["world render"] + [name for name in pipes for _ in range(per)]
    return save_grid(path, rows, columns)


def table(runs: list[dict], names: tuple[str, str]) -> tuple[str, list[dict]]:
    old, new = names
    lines = [f"| metric | {old} | {new} | {new} - {old} (paired) |", "|---|---:|---:|---|"]
    rows = []
    for metric in PAIR_METRICS + ONE_METRICS:
        vals = {b: [r[metric] for r in sorted(runs, key=lambda r: r["seed"]) if r["base"] == b] for b in names}
        cells = {b: mean_ci(v, bounds=(0.0, 1.0)) for b, v in vals.items()}
        test = paired_test(vals[new], vals[old])
        rows.append({"kind": "summary", "metric": metric, **{b: cells[b] for b in names}, "paired": test})
        p = "n/a" if test["p"] is None else f"{test['p']:.3f}"
        lines.append(f"| {metric} | " + " | ".join(f"{cells[b]['mean']:.3f} [{cells[b]['ci_low']:.3f}, "
                                                  f"{cells[b]['ci_high']:.3f}]" for b in names)
                     + f" | {test['diff']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}], p={p} |")
    return "\n".join(lines), rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=REPO / "assets" / "toy-base")
    parser.add_argument("--new", type=Path, default=REPO / "assets" / "toy-base-2obj")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=64, help="captions per kind, seed and base")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="toy_base_2obj")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for folder in (args.old, args.new):
        if not (folder / "model_index.json").is_file():
            parser.error(f"{folder}: not a diffusers model folder (no model_index.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    names = (args.old.name, args.new.name)
    pipes = {name: load_pipe(folder) for name, folder in zip(names, (args.old, args.new), strict=True)}
    runs = [{"kind": "run", "base": name, "seed": seed, **measure(pipe, args, seed)}
            for seed in range(args.seeds) for name, pipe in pipes.items()]
    grid = pair_grid(pipes, args.out_dir / f"{args.name}_grid.png")
    text, summary = table(runs, names)
    notes = (__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2] + f"\n\n{args.seeds} seeds x {args.n} "
             f"captions per kind; {args.gen_steps} denoising steps (the pipeline's DDIM), guidance {args.guidance}. "
             f"Wall time {time.perf_counter() - started:.0f} s. Grid: `{grid.name}` (held-out two-object captions; "
             f"columns: the world's render, then 3 images of {names[0]}, 3 of {names[1]}).")
    write_results(args.name, runs + summary, text, notes, args.out_dir)
    return {"runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
