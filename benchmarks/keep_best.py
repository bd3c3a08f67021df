"""Scores over training and `--keep_best` on the toy world (issue: subject-fidelity evaluation).

Per seed, a DreamBooth run with the demo's recipe (benchmarks/quality.py DEFAULTS) validates every
`--validation-steps` with the bare instance prompt and the toy checker (`--validation_metrics toy`: subject shown,
prompt followed), keeping the best-scoring step's adapter (`--keep_best`). Then the best and the last adapter are
compared on HELD-OUT prompts (the quality benchmark's scenes none of the photos shows, never used for the choice)
with `python -m moslora_diffusion.evaluate --metrics toy`: does the step the validation chose generalise better
than the last one? Means over seeds with 95% t intervals and a paired t-test (best - last).

    python -m benchmarks.keep_best --threads 1        # 3 seeds x 600 steps -> benchmarks/results/keep_best.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.quality import DEFAULTS
from benchmarks.quality_split import instance_prompts
from moslora_diffusion.evaluation.stats import mean_ci, paired_test

REPO = Path(__file__).resolve().parents[1]


def train_run(args, seed: int, out: Path) -> None:
    from accelerate.state import AcceleratorState, GradientState

    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT
    from moslora_diffusion.training import TrainConfig, train

    config = TrainConfig(
        pretrained_model_name_or_path=str(args.base), instance_data_dir=str(REPO / "assets" / "toy-subject"),
        instance_prompt=INSTANCE_PROMPT, with_prior_preservation=True, class_prompt=CLASS_PROMPT,
        class_data_dir=str(args.work_dir / "class-images"), num_class_images=DEFAULTS["num_class_images"],
        resolution=64, rank=DEFAULTS["rank"], target_modules=DEFAULTS["target_modules"],
        train_text_encoder=DEFAULTS["train_text_encoder"], learning_rate=DEFAULTS["learning_rate"],
        lr_scheduler="constant_with_warmup", lr_warmup_steps=20, train_batch_size=DEFAULTS["batch"],
        max_train_steps=args.steps, seed=seed, output_dir=str(out), overwrite_output_dir=True, report_to="none",
        checkpointing_steps=10**6, logging_steps=50, validation_prompt=INSTANCE_PROMPT,
        validation_steps=args.validation_steps, num_validation_images=args.validation_images,
        validation_inference_steps=args.gen_steps, validation_metrics="toy", keep_best=True)
    for reset in (lambda: AcceleratorState._reset_state(True), GradientState._reset_state):
        reset()
    train(config)


def validation_scores(out: Path) -> list[dict]:
    """The {"step", <metric>: ...} lines progress.jsonl holds for each validation."""
    rows = []
    for line in (out / "progress.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "scores" in record:
            rows.append({"step": record["step"], **record["scores"]})
    return rows


def held_out(args, out: Path, seed: int) -> dict[str, dict[str, float]]:
    """Mean toy scores of the best and the last adapter on the held-out prompts (evaluate command)."""
    from moslora_diffusion.evaluate import main as evaluate

    folder = args.work_dir / f"heldout-seed{seed}"
    argv = ["--base", str(args.base), "--metrics", "toy", "--photos", str(REPO / "assets" / "toy-subject"),
            "--adapter", f"best={out / 'moslora_best.safetensors'}", "--adapter", f"last={out / 'moslora.safetensors'}",
            "--seeds", *map(str, range(args.eval_seeds)), "--steps", str(args.gen_steps), "--guidance", "5",
            "--sampler", "DDIM", "--size", "64", "--out", str(folder)]
    for prompt in instance_prompts(args.prompts):
        argv += ["--prompt", prompt.prompt]
    evaluate(argv)
    report = json.loads((folder / "report.json").read_text())
    return {label: {metric: stats["mean"] for metric, stats in entry["overall"].items()}
            for label, entry in report["adapters"].items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--validation-steps", type=int, default=100)
    parser.add_argument("--validation-images", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts")
    parser.add_argument("--eval-seeds", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "keep-best-bench")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="keep_best")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        out = args.work_dir / f"run-seed{seed}"
        train_run(args, seed, out)
        scores = held_out(args, out, seed)
        runs.append({"seed": seed, "validation": validation_scores(out), "heldout": scores})
        print(json.dumps(runs[-1]), flush=True)
    metrics = sorted(runs[0]["heldout"]["best"])
    lines = ["| held-out metric | best step's adapter | last step's adapter | best - last (paired) |",
             "|---|---:|---:|---|"]
    rows = []
    for metric in metrics:
        best = [r["heldout"]["best"][metric] for r in runs]
        last = [r["heldout"]["last"][metric] for r in runs]
        b, la, d = mean_ci(best, bounds=(0, 1)), mean_ci(last, bounds=(0, 1)), paired_test(best, last)
        p = "n/a" if d["p"] is None else f"{d['p']:.3f}"
        lines.append(f"| {metric} | {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] | {la['mean']:.3f} "
                     f"[{la['ci_low']:.3f}, {la['ci_high']:.3f}] | {d['diff']:+.3f} [{d['ci_low']:+.3f}, "
                     f"{d['ci_high']:+.3f}], p={p} |")
        rows.append({"kind": "summary", "metric": metric, "best": b, "last": la, "paired": d})
    lines += ["", "Validation scores over training (mean of the metrics, per seed; * the step kept):", ""]
    for run in runs:
        marks = []
        def mean_score(v):  # the plain mean of the metrics, what --keep_best ranks steps by
            values = [x for k, x in v.items() if k != "step"]
            return sum(values) / len(values)

        chosen = max(run["validation"], key=mean_score) if run["validation"] else None
        for v in run["validation"]:
            marks.append(f"{v['step']}: {mean_score(v):.2f}" + ("*" if v is chosen else ""))
        lines.append(f"- seed {run['seed']}: " + ", ".join(marks))
    notes = (__doc__.split("\n\n")[1] + f"\n\nSettings: {json.dumps({k: str(v) for k, v in vars(args).items()})}.")
    write_results(args.name, [{"kind": "run", **r} for r in runs] + rows, "\n".join(lines), notes, args.out_dir)
    return {"runs": runs, "summary": rows}


if __name__ == "__main__":
    main()
