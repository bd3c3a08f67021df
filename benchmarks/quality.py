"""DreamBooth quality on the toy world: MoSLoRA (kaiming / orthogonal mixer) vs LoRA at equal rank and steps.

Every variant is trained with our trainer on the toy subject (assets/toy-subject, a yellow-and-black striped
star) with prior preservation, once per seed, with the same rank, alpha, steps, learning rate and class images
(generated once from the base model and shared by every run). Each trained adapter then draws, with fixed
generation seeds that are the same for every run:

- instance prompts that put the subject in scenes none of its photos shows ("a photo of sks star on the left,
  on a gray background"): (position, background) pairs not among the photos, backgrounds it stands out on;
- the class prompt ("a photo of a star"), also drawn by the base model with the same seeds.

The toy world's ground truth scores the images from their pixels (moslora_diffusion.toy.checker / subject):

- subject fidelity: share of instance images showing the subject (`is_subject`), and the mean `subject_score`;
- prompt fidelity: share of instance images whose background / position (checker) are the prompt's;
- prior preservation: share of class images whose checker reading (class, colour, background) equals the base
  model's image for the same seed, the mean absolute pixel difference to it, and the share of class images
  that show the subject (leakage);
- diversity of the class images: mean pairwise pixel distance and distinct (colour, background) readings.

Per variant: mean over seeds with a 95% t confidence interval; each MoSLoRA variant vs LoRA: a paired t-test
over seeds (same seed = same data order, noise and adapter A init), significant when p < 0.05.

    python -m benchmarks.quality                                   # 3 variants x 5 seeds, assets/toy-base
    python -m benchmarks.quality --seeds 2 --steps 20 --n-images 4 --out-dir /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_results

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"moslora_kaiming": ("moslora", "kaiming"), "moslora_orthogonal": ("moslora", "orthogonal"),
            "lora": ("lora", "identity")}
BASELINE = "lora"
GEN_SEED = 1234  # generation seed of every evaluation image (the same for every run and the base model)

# The DreamBooth settings of the benchmark (and of scripts/demo.sh): found on the toy base model, see the notes.
DEFAULTS = dict(rank=8, steps=200, learning_rate=1e-3, batch=4, prior_loss_weight=1.0, num_class_images=24,
                train_text_encoder=False, target_modules="attn")


@dataclass(frozen=True)
class InstancePrompt:
    prompt: str
    position: str
    background: str


# --- statistics (no scipy) -----------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes, Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t, by bisection on the two-sided tail."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf_two_sided(mid, df) > 2 * (1 - p):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean and the t confidence interval of the mean (a single value: an interval of zero width)."""
    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "sd": 0.0, "n": n}
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd": sd, "n": n}


def paired_test(a: list[float], b: list[float], alpha: float = 0.05) -> dict:
    """Paired t-test of a - b over seeds: mean difference, its 95% CI, two-sided p, significant at alpha."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"diff": mean, "ci_low": mean, "ci_high": mean, "t": None, "p": None, "significant": False, "n": n}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p = t_sf_two_sided(t, n - 1)
    ci = mean_ci(list(d))
    return {"diff": mean, "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "t": None if math.isinf(t) else t,
            "p": p, "significant": bool(p < alpha), "n": n}


# --- prompts and metrics ---------------------------------------------------------------------------------


def instance_prompts(n: int) -> list[InstancePrompt]:
    """`n` prompts placing the subject in (position, background) pairs that none of its photos shows."""
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT, PHOTOS, SUBJECT_BACKGROUNDS
    from moslora_diffusion.toy.world import POSITIONS

    seen = {(photo[0], photo[2]) for photo in PHOTOS}
    # Backgrounds outer loop, positions inner, interleaved so that a short list still varies both.
    pairs = [(pos, bg) for i, (bg, pos) in enumerate(itertools.product(SUBJECT_BACKGROUNDS, POSITIONS))
             if (pos, bg) not in seen]
    pairs = pairs[::2] + pairs[1::2]
    return [InstancePrompt(f"{INSTANCE_PROMPT} {POSITIONS[pos][1]}, on a {bg} background", pos, bg)
            for pos, bg in (pairs[i % len(pairs)] for i in range(n))]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def mean_pairwise_distance(images) -> float:
    """Mean absolute pixel difference (0..1) over all pairs of images."""
    x = _pixels(images).reshape(len(images), -1)
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean([np.abs(x[i] - x[j]).mean() for i, j in pairs])) if pairs else 0.0


def instance_metrics(images, prompts: list[InstancePrompt]) -> dict:
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import subject_score

    readings = [check(im) for im in images]
    scores = [subject_score(im) for im in images]
    from moslora_diffusion.toy.subject import THRESHOLD

    bg_ok = [r.background == p.background for r, p in zip(readings, prompts, strict=True)]
    pos_ok = [r.position == p.position for r, p in zip(readings, prompts, strict=True)]
    return {"subject_rate": float(np.mean([s >= THRESHOLD for s in scores])),
            "subject_score": float(np.mean(scores)),
            "prompt_background": float(np.mean(bg_ok)), "prompt_position": float(np.mean(pos_ok)),
            "prompt_fidelity": float(np.mean([b and p for b, p in zip(bg_ok, pos_ok, strict=True)]))}


def class_metrics(images, base_images) -> dict:
    from moslora_diffusion.toy.checker import check
    from moslora_diffusion.toy.subject import is_subject

    readings = [check(im) for im in images]
    base_readings = [check(im) for im in base_images]
    same = [(r.colour, r.background, r.position) == (b.colour, b.background, b.position)
            for r, b in zip(readings, base_readings, strict=True)]
    pixel = np.abs(_pixels(images) - _pixels(base_images)).mean(axis=(1, 2, 3))
    return {"prior_agreement": float(np.mean(same)), "prior_pixel_distance": float(pixel.mean()),
            "prior_subject_leak": float(np.mean([is_subject(im) for im in images])),
            "diversity_pixel": mean_pairwise_distance(images),
            "diversity_distinct": float(len({(r.colour, r.background) for r in readings}) / len(readings))}


# name, what it is, which direction is better
METRICS = (
    ("subject_rate", "instance images showing the subject (is_subject)", "higher"),
    ("subject_score", "mean subject_score of the instance images", "higher"),
    ("prompt_fidelity", "instance images with the prompt's background and position", "higher"),
    ("prompt_background", "instance images with the prompt's background", "higher"),
    ("prompt_position", "instance images with the prompt's position", "higher"),
    ("prior_agreement", "class images read (colour, background, position) as the base model's same-seed image",
     "higher"),
    ("prior_pixel_distance", "mean |pixel difference| of class images to the base model's same-seed image",
     "lower"),
    ("prior_subject_leak", "class images that show the subject", "lower"),
    ("diversity_pixel", "mean pairwise |pixel difference| among class images", "higher"),
    ("diversity_distinct", "distinct (colour, background) readings among class images / images", "higher"),
)
PROPORTIONS = {"subject_rate", "subject_score", "prompt_fidelity", "prompt_background", "prompt_position",
               "prior_agreement", "prior_pixel_distance", "prior_subject_leak", "diversity_pixel",
               "diversity_distinct"}


# --- training and generation -------------------------------------------------------------------------------


def load_pipe(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prepare_class_images(pipe, folder: Path, n: int, steps: int, guidance: float) -> Path:
    """`n` class-prompt images from the base model (seed 0), shared by every run; kept if already there."""
    from moslora_diffusion.toy.evaluate import generate
    from moslora_diffusion.toy.subject import CLASS_PROMPT

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) < n:
        for i, image in enumerate(generate(pipe, [CLASS_PROMPT] * n, seed=0, steps=steps, guidance=guidance)):
            image.save(folder / f"class_{i:04d}.png")
    return folder


def train_variant(args, variant: str, seed: int, class_dir: Path, output_dir: Path) -> float:
    """Trains one adapter in-process; returns the wall time in seconds."""
    from accelerate.state import AcceleratorState, GradientState

    from moslora_diffusion.toy.subject import CLASS_PROMPT, INSTANCE_PROMPT
    from moslora_diffusion.training import TrainConfig, train

    kind, mixer_init = VARIANTS[variant]
    config = TrainConfig(
        pretrained_model_name_or_path=str(args.base), instance_data_dir=str(args.instance_dir),
        instance_prompt=INSTANCE_PROMPT, with_prior_preservation=args.prior_loss_weight > 0, class_prompt=CLASS_PROMPT,
        class_data_dir=str(class_dir), num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight, resolution=64, adapter=kind, mixer_init=mixer_init,
        target_modules=args.target_modules,
        rank=args.rank, lora_alpha=float(args.alpha or args.rank), learning_rate=args.learning_rate,
        lr_warmup_steps=min(20, args.steps // 5), lr_scheduler="constant_with_warmup",
        train_batch_size=args.batch, max_train_steps=args.steps, train_text_encoder=args.train_text_encoder,
        seed=seed, output_dir=str(output_dir), overwrite_output_dir=True, report_to="none",
        checkpointing_steps=10**9, logging_steps=25)
    started = time.perf_counter()
    for reset in (lambda: AcceleratorState._reset_state(True), GradientState._reset_state):
        reset()  # accelerate keeps process-wide singletons; every run here is independent
    try:
        train(config)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return time.perf_counter() - started


def draw(pipe, prompts: list[str], args) -> list:
    from moslora_diffusion.toy.evaluate import generate

    return generate(pipe, prompts, seed=GEN_SEED, steps=args.gen_steps, guidance=args.guidance)


def evaluate_adapter(pipe, adapter_file: Path | None, args, base_class_images) -> tuple[dict, list, list]:
    """Metrics of the pipeline with the adapter attached (None: the base model); detaches it afterwards."""
    import moslora_diffusion as md
    from moslora_diffusion.toy.subject import CLASS_PROMPT

    if adapter_file is not None:
        md.load_adapter(pipe, adapter_file)
    try:
        prompts = instance_prompts(args.n_images)
        inst = draw(pipe, [p.prompt for p in prompts], args)
        cls = draw(pipe, [CLASS_PROMPT] * args.n_images, args)
    finally:
        md.detach_from_pipeline(pipe)
    metrics = {**instance_metrics(inst, prompts), **class_metrics(cls, base_class_images or cls)}
    return metrics, inst, cls


# --- report -------------------------------------------------------------------------------------------------


def aggregate(runs: list[dict], variants: list[str]) -> dict:
    summary = {}
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        summary[variant] = {m: mean_ci([r[m] for r in mine]) for m, _, _ in METRICS}
    return summary


def compare(runs: list[dict], variants: list[str]) -> dict:
    """Each MoSLoRA variant vs the LoRA baseline, paired by seed."""
    out = {}
    if BASELINE not in variants:
        return out
    base = {r["seed"]: r for r in runs if r["variant"] == BASELINE}
    for variant in variants:
        if variant == BASELINE:
            continue
        mine = {r["seed"]: r for r in runs if r["variant"] == variant}
        seeds = sorted(set(mine) & set(base))
        out[f"{variant}_vs_{BASELINE}"] = {m: paired_test([mine[s][m] for s in seeds], [base[s][m] for s in seeds])
                                           for m, _, _ in METRICS}
    return out


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def tables(summary: dict, comparisons: dict, base_metrics: dict) -> str:
    variants = list(summary)
    lines = ["| metric | better | base model | " + " | ".join(variants) + " |",
             "|---|---|---:|" + "---:|" * len(variants)]
    for m, _, better in METRICS:
        lines.append(f"| {m} | {better} | {base_metrics[m]:.3f} | "
                     + " | ".join(_fmt(summary[v][m]) for v in variants) + " |")
    if comparisons:
        lines += ["", "Paired differences (variant - lora, same seed), 95% CI, paired t-test:", "",
                  "| metric | " + " | ".join(comparisons) + " |", "|---|" + "---|" * len(comparisons)]
        for m, _, _ in METRICS:
            cells = []
            for comp in comparisons.values():
                c = comp[m]
                p = "n/a" if c["p"] is None else f"{c['p']:.3f}"
                sig = "**significant**" if c["significant"] else "not significant"
                cells.append(f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p={p}, {sig}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(comparisons: dict) -> str:
    parts = []
    for name, comp in comparisons.items():
        sig = [f"{m} ({'better' if (c['diff'] > 0) == (better == 'higher') else 'worse'}, p={c['p']:.3f})"
               for m, _, better in METRICS if (c := comp[m])["significant"]]
        parts.append(f"{name}: " + (", ".join(sig) if sig else "no significant difference on any metric"))
    return "; ".join(parts)


def save_grid(path: Path, rows: list[tuple[str, list]], columns: list[str], scale: int = 2) -> Path:
    """Rows of images under column captions (prompt texts, wrapped), label column on the left."""
    from PIL import Image, ImageDraw

    side, label_w, head_h = 64 * scale, 130, 44
    grid = Image.new("RGB", (label_w + side * len(columns), head_h + side * len(rows)), "white")
    draw_ = ImageDraw.Draw(grid)
    for c, text in enumerate(columns):
        words, line, out = text.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > side // 6:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        out.append(line)
        draw_.multiline_text((label_w + c * side + 2, 2), "\n".join(out[-4:]), fill="black", spacing=0)
    for r, (label, images) in enumerate(rows):
        draw_.text((4, head_h + r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.NEAREST), (label_w + c * side, head_h + r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "toy-base", help="toy base model folder")
    parser.add_argument("--instance-dir", type=Path, default=REPO / "assets" / "toy-subject")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per variant (0 .. N-1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps of every run")
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--target-modules", default=DEFAULTS["target_modules"],
                        help="UNet adapter targets: a preset (attn, attn+proj, attn+ff, all) or module names")
    parser.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: the rank)")
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="instance images per step "
                        "(plus as many class images)")
    parser.add_argument("--prior-loss-weight", type=float, default=DEFAULTS["prior_loss_weight"])
    parser.add_argument("--num-class-images", type=int, default=DEFAULTS["num_class_images"])
    parser.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS["train_text_encoder"])
    parser.add_argument("--n-images", type=int, default=24, help="instance images and class images per run")
    parser.add_argument("--gen-steps", type=int, default=25, help="denoising steps per evaluation image")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="quality", help="results file name (<out-dir>/<name>.md/.json)")
    parser.add_argument("--grid", type=Path, default=None, help="image grid PNG (default: <out-dir>/<name>_grid.png)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep class images and adapters here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not (args.base / "model_index.json").is_file():
        parser.error(f"--base {args.base}: not a diffusers folder (train the toy base model first)")
    if args.seeds < 1 or args.n_images < 2:
        parser.error("--seeds must be >= 1 and --n-images >= 2")
    return args


def run(args, work: Path) -> dict:
    from moslora_diffusion.toy.subject import CLASS_PROMPT

    pipe = load_pipe(args.base)
    class_dir = prepare_class_images(pipe, work / "class-images", args.num_class_images, args.gen_steps,
                                     args.guidance)
    base_metrics, base_inst, base_cls = evaluate_adapter(pipe, None, args, None)
    grid_rows = [("base model", base_inst[:4] + base_cls[:4])]
    runs = []
    for seed in range(args.seeds):
        for variant in args.variants:
            out = work / f"{variant}-seed{seed}"
            seconds = train_variant(args, variant, seed, class_dir, out)
            metrics, inst, cls = evaluate_adapter(pipe, out / "moslora.safetensors", args, base_cls)
            runs.append({"variant": variant, "seed": seed, "train_seconds": round(seconds, 1), **metrics})
            print(json.dumps(runs[-1]), flush=True)
            if seed == 0:
                grid_rows.append((variant, inst[:4] + cls[:4]))
    prompts = [p.prompt for p in instance_prompts(args.n_images)][:4] + [CLASS_PROMPT] * min(4, args.n_images)
    grid = save_grid(args.grid or args.out_dir / f"{args.name}_grid.png", grid_rows,
                     [p.replace("a photo of ", "") for p in prompts[:len(grid_rows[0][1])]])
    return {"runs": runs, "base_metrics": base_metrics, "grid": str(grid)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.work_dir:
        result = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
            result = run(args, Path(tmp))
    summary = aggregate(result["runs"], args.variants)
    comparisons = compare(result["runs"], args.variants)
    settings = {"base": str(args.base), "seeds": args.seeds, "variants": args.variants, "steps": args.steps,
                "rank": args.rank, "alpha": args.alpha or args.rank, "learning_rate": args.learning_rate,
                "batch": args.batch, "prior_loss_weight": args.prior_loss_weight,
                "num_class_images": args.num_class_images, "train_text_encoder": args.train_text_encoder,
                "n_images": args.n_images, "gen_steps": args.gen_steps, "guidance": args.guidance,
                "generation_seed": GEN_SEED, "total_seconds": round(time.perf_counter() - started, 1)}
    notes = (
        "DreamBooth on the toy subject (assets/toy-subject) with prior preservation; every variant with the same "
        f"rank {args.rank}, alpha {args.alpha or args.rank}, {args.steps} steps, learning rate {args.learning_rate}, "
        f"batch {args.batch} (+{args.batch} class images), prior loss weight {args.prior_loss_weight}, "
        f"{args.num_class_images} shared class images, text encoder "
        f"{'trained' if args.train_text_encoder else 'frozen'}"
        f"; {args.seeds} training seeds per variant. Evaluation: {args.n_images} instance images (subject in "
        f"scenes its photos never show) and {args.n_images} class-prompt images per run, {args.gen_steps} DDIM "
        f"steps, guidance {args.guidance}, generation seed {GEN_SEED} for every run and the base model. Cells: "
        "mean over seeds [95% t confidence interval]; the base model column is the untrained model (one "
        "evaluation). Significance: paired t-test over seeds, two-sided, p < 0.05.\n\n"
        + "\n".join(f"- `{m}` ({better} is better): {what}" for m, what, better in METRICS)
        + f"\n\nBase model: `{args.base}`. Mean training run: "
        f"{np.mean([r['train_seconds'] for r in result['runs']]):.0f} s "
        f"(torch threads {torch.get_num_threads()}). Whole benchmark: {settings['total_seconds']:.0f} s.\n\n"
        f"Verdict: {verdict(comparisons) or 'no LoRA baseline in this run'}.\n\n"
        f"Grid: `{Path(result['grid']).name}` (rows: base model, then each variant trained with seed 0; columns: "
        "4 instance prompts, then 4 class-prompt images).")
    rows = [{"kind": "settings", **settings}, {"kind": "base_model", **result["base_metrics"]}]
    rows += [{"kind": "run", **r} for r in result["runs"]]
    rows += [{"kind": "summary", "variant": v, **{m: s for m, s in stats.items()}} for v, stats in summary.items()]
    rows += [{"kind": "comparison", "comparison": c, **tests} for c, tests in comparisons.items()]
    write_results(args.name, rows, tables(summary, comparisons, result["base_metrics"]), notes, args.out_dir)
    return {"settings": settings, "summary": summary, "comparisons": comparisons, **result}


if __name__ == "__main__":
    main()
