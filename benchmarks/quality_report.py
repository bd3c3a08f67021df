"""The quality benchmark's report: per split (validation, test), means with 95% CIs per recipe and paired tests
against the reference recipe; the targets on test (quality_targets.py); the image grid,
the notes, and merging the results of seeds run in parallel processes (benchmarks/quality.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from benchmarks.quality_metrics import METRICS
from benchmarks.quality_split import SPLIT_GEN_SEEDS, SPLITS, instance_prompts
from benchmarks.quality_targets import choice_table, chosen_on_validation, chosen_recipe, targets_table
from moslora_diffusion.evaluation.stats import mean_ci, paired_test

BOUNDS = (0.0, 1.0)  # every metric is a share or a mean of 0..1 values: CIs are clipped to this range


def aggregate(runs: list[dict], variants: list[str], split: str) -> dict:
    """{variant: {metric: mean_ci over seeds}} of one split."""
    summary = {}
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        summary[variant] = {m: mean_ci([r[split][m] for r in mine], bounds=BOUNDS) for m, _, _ in METRICS}
    return summary


def compare(runs: list[dict], variants: list[str], reference: str, split: str) -> dict:
    """Each variant vs the reference on one split, paired by seed (same data order, noise and A init)."""
    ref = {r["seed"]: r for r in runs if r["variant"] == reference}
    out = {}
    for variant in variants:
        if variant == reference:
            continue
        mine = {r["seed"]: r for r in runs if r["variant"] == variant}
        seeds = sorted(set(mine) & set(ref))
        out[f"{variant}_vs_{reference}"] = {
            m: paired_test([mine[s][split][m] for s in seeds], [ref[s][split][m] for s in seeds])
            for m, _, _ in METRICS}
    return out


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def summary_table(summary: dict, base_metrics: dict) -> str:
    variants = list(summary)
    lines = ["| metric | better | base model | " + " | ".join(variants) + " |",
             "|---|---|---:|" + "---:|" * len(variants)]
    for m, _, better in METRICS:
        lines.append(f"| {m} | {better} | {base_metrics[m]:.3f} | "
                     + " | ".join(_fmt(summary[v][m]) for v in variants) + " |")
    return "\n".join(lines)


def comparison_table(comparisons: dict, reference: str) -> str:
    lines = [f"Paired differences (variant - {reference}, same seed), 95% CI, paired t-test:", "",
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


def tables(summary: dict, comparisons: dict, base_metrics: dict, reference: str) -> str:
    """Test first (what is reported), then validation (what chooses), then the targets and the choices."""
    parts = []
    for split, title in (("test", "Test split (reported; never used to choose)"),
                         ("validation", "Validation split (used to choose recipes and settings)")):
        parts += [f"## {title}", "", summary_table(summary[split], base_metrics[split])]
        if comparisons[split]:
            parts += ["", comparison_table(comparisons[split], reference)]
        parts.append("")
    n_seeds = summary["test"][next(iter(summary["test"]))]["subject_rate"]["n"]
    parts += ["## Targets and choices", "", targets_table(summary["test"], n_seeds), "", choice_table(summary)]
    return "\n".join(parts)


def verdict(comparisons: dict) -> str:
    parts = []
    for name, comp in comparisons.items():
        sig = [f"{m} ({'better' if (c['diff'] > 0) == (better == 'higher') else 'worse'}, p={c['p']:.3f})"
               for m, _, better in METRICS if (c := comp[m])["significant"]]
        parts.append(f"{name}: " + (", ".join(sig) if sig else "no significant difference on any metric"))
    return "; ".join(parts)


def grid_images(instance: list, classes: list, n: int) -> list:
    """What a grid row shows: 2 images of the bare instance prompt, 4 of instance prompts with scenes, 2 of the
    plain class prompt, 2 of class prompts with scenes (`instance`: n bare, then n with scenes)."""
    return instance[:2] + instance[n:n + 4] + classes[:2] + classes[n:n + 2]


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


def _recipes_note(settings: dict) -> str:
    rows = [f"- `{name}`: " + (", ".join(f"{k}={v}" for k, v in over.items()) or "the shared settings")
            for name, over in settings["recipes"].items()]
    return "Recipes (TrainConfig overrides on the shared settings):\n\n" + "\n".join(rows)


def _split_note(n: int) -> str:
    from moslora_diffusion.toy.subject import INSTANCE_PROMPT
    val, test = (instance_prompts(n, split) for split in SPLITS)

    def show(prompts) -> str:
        return "; ".join(sorted({p.prompt.replace(INSTANCE_PROMPT, "").strip(" ,") for p in prompts}))

    return (f"Fair split (quality_split.py): validation scenes [{show(val)}]; test scenes [{show(test)}]. No scene is "
            "in both (a checkerboard over the (position, background) grid); validation chooses, test is reported. "
            f"Generation seeds: {SPLIT_GEN_SEEDS}.")


def describe(settings: dict, result: dict, comparisons: dict) -> str:
    """The notes above the tables: what was trained and measured, how to read it, the verdict (on test)."""
    st = settings
    encoder = (f"text encoder adapters trained (lr {st['text_encoder_lr'] or st['learning_rate']})"
               if st["train_text_encoder"] else "text encoder frozen")
    captions = {"scene": "each photo captioned with its scene (caption sidecars)",
                "mixed": "each photo 4 times, captioned with its scene, its background, its position and nothing",
                "prompt": "every photo captioned with the instance prompt"}[st["captions"]]
    seeds, n = st["seed_list"], st["n_images"]
    mean_train = np.mean([r["train_seconds"] for r in result["runs"]])
    return (
        f"DreamBooth on the toy subject (`{Path(st['instance_dir']).name}`, {captions} unless a recipe says "
        f"otherwise) with prior preservation. Shared settings: rank {st['rank']}, alpha {st['alpha']}, UNet targets "
        f"`{st['target_modules']}`, {encoder}, {st['steps']} steps, learning rate {st['learning_rate']}, batch "
        f"{st['batch']} (+{st['batch']} class images), prior loss weight {st['prior_loss_weight']}, the same "
        f"{st['num_class_images']} class images (generated once from the base model); {len(seeds)} training seeds "
        f"({', '.join(map(str, seeds))}) per recipe.\n\n{_recipes_note(st)}\n\n{_split_note(n)}\n\n"
        f"Evaluation per run and split: {n} instance prompts placing the subject in the split's scenes (2 in 3 a new "
        f"(position, background) pair, the rest only a background or only a position), {n} bare instance prompts, "
        f"{n} plain class prompts and {n} class prompts with the split's scenes; {st['gen_steps']} denoising steps, "
        f"guidance {st['guidance']}, the split's generation seed for every run and for the base model. Every image "
        "is scored from its pixels with the toy world's checker and subject score.\n\n"
        "Cells: mean over seeds [95% t confidence interval, clipped to 0..1]; the base-model column is one "
        "evaluation of the untrained model (its prior metrics compare it with itself). Differences: each recipe "
        f"minus `{st['reference']}` on the same seed (same data order, noise and A initialisation), paired t-test, "
        "two-sided, significant when p < 0.05 (no correction for the number of metrics).\n\n"
        + "\n".join(f"- `{m}` ({better} is better): {what}" for m, what, better in METRICS)
        + f"\n\nBase model: `{st['base']}`. Mean training run {mean_train:.0f} s, whole benchmark "
        f"{st['total_seconds']:.0f} s wall (torch threads {st['torch_threads']}{st.get('parts_note', '')}).\n\n"
        f"Verdict on test: {verdict(comparisons['test']) or 'one recipe only, nothing compared'}.\n\n"
        f"Grid: `{Path(result['grid']).name}` (test split; rows: the base model, then each recipe trained with the "
        "first seed; columns: 2 bare instance prompts, 4 instance prompts with scenes, 2 plain class prompts, 2 class "
        "prompts with scenes; same seeds in every row).")


def report(settings: dict, result: dict, out_dir: Path, name: str) -> dict:
    """Summary and paired comparisons per split, targets, and the results files of finished runs."""
    variants, reference = settings["variants"], settings["reference"]
    summary = {split: aggregate(result["runs"], variants, split) for split in SPLITS}
    comparisons = {split: compare(result["runs"], variants, reference, split) for split in SPLITS}
    notes = describe(settings, result, comparisons)
    rows = [{"kind": "settings", **settings}, {"kind": "base_model", **result["base_metrics"]}]
    rows += [{"kind": "run", **r} for r in result["runs"]]
    rows += [{"kind": "summary", "split": split, "variant": v, **stats}
             for split in SPLITS for v, stats in summary[split].items()]
    rows += [{"kind": "comparison", "split": split, "comparison": c, **tests}
             for split in SPLITS for c, tests in comparisons[split].items()]
    rows.append({"kind": "chosen_on_validation", **chosen_on_validation(summary), "recipe": chosen_recipe(summary)})
    write_results(name, rows, tables(summary, comparisons, result["base_metrics"], reference), notes, out_dir)
    return {"settings": settings, "summary": summary, "comparisons": comparisons, **result}


def merge_parts(paths: list[Path], out_dir: Path, name: str, grid: Path | None) -> dict:
    """One report from results files of the same settings (runs in parallel processes, or recipes added later).

    Parts may split the seeds of one recipe list, or run different recipes (then every recipe must have been run
    with the same seeds): each (recipe, seed) must come from exactly one part.
    """
    parts = [json.loads(Path(p).read_text())["rows"] for p in paths]
    settings = [next(r for r in rows if r["kind"] == "settings") for rows in parts]
    ignored = {"seeds", "seed_list", "seed_start", "total_seconds", "parts_note", "variants", "recipes", "reference"}
    for other, path in zip(settings[1:], paths[1:], strict=True):
        differing = sorted(k for k in other if k not in ignored and other[k] != settings[0].get(k))
        if differing:
            raise SystemExit(f"--merge: {path} was run with other settings: {', '.join(differing)}")
    recipes = {}
    for s in settings:
        for variant, recipe in s["recipes"].items():
            if recipes.setdefault(variant, recipe) != recipe:
                raise SystemExit(f"--merge: recipe {variant!r} has other settings in another part")
    variants = list(dict.fromkeys(v for s in settings for v in s["variants"]))
    runs = [{k: v for k, v in r.items() if k != "kind"} for rows in parts for r in rows if r["kind"] == "run"]
    seeds = sorted({r["seed"] for r in runs})
    pairs = {(r["variant"], r["seed"]) for r in runs}
    if len(pairs) != len(runs) or len(pairs) != len(seeds) * len(variants):
        raise SystemExit("--merge: the parts share (recipe, seed) runs, or a recipe lacks some seeds")
    missing = sorted({m for r in runs for split in SPLITS for m, _, _ in METRICS if m not in r[split]})
    if missing:  # a part recorded before a metric existed (e.g. class_object_rate): run it again
        raise SystemExit(f"--merge: a part has no {', '.join(missing)} (recorded before that metric existed); run it "
                         "again with this benchmark")
    merged = {**settings[0], "variants": variants, "recipes": recipes, "seeds": len(seeds), "seed_list": seeds,
              "seed_start": seeds[0], "total_seconds": sum(s["total_seconds"] for s in settings),
              "parts_note": f"; the sum of {len(paths)} parts' wall times, the parts ran two at a time"}
    base = {k: v for k, v in next(r for r in parts[0] if r["kind"] == "base_model").items() if k != "kind"}
    grid = grid or out_dir / f"{name}_grid.png"
    return report(merged, {"runs": runs, "base_metrics": base, "grid": str(grid)}, out_dir, name)
