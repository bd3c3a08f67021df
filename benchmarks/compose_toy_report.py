"""The composition benchmark's metrics per case, its tables, targets and image grid (benchmarks/compose_toy.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.compose_toy_cases import KINDS, SUBJECTS, Case
from moslora_diffusion.evaluation.stats import mean_ci, paired_test

METRICS = {  # kind -> (metric, what it counts) ; every metric a share of the case's images
    "pair": (("star", "the striped star in its place"), ("square", "the checkered square in its place"),
             ("mixing", "an object in a subject's place carrying the other subject's pattern (alone or mixed)"),
             ("joint", "both subjects in place with their own patterns, no mixing")),
    "zigzag": (("star", "the striped star in its place"), ("zigzag", "the zigzag background"),
               ("mixing", "the star's object carrying the checkerboard"),
               ("joint", "star in place and zigzag background, no mixing")),
    "one": (("subject", "the named subject (anywhere, or in its place)"), ("mixing", "its object carrying the "
            "other subject's pattern"), ("joint", "the subject shown, no mixing")),
}
SPATIAL = ("regional", "auto", "spatial_mole")
LOWER_IS_BETTER = {"mixing"}


def seed_metrics(case: Case, images: list) -> dict[str, float]:
    """The case's metrics (METRICS[case.kind]) over its images."""
    from moslora_diffusion.toy.composition_check import measure, rates

    r = rates([measure(im, case.expected) for im in images])
    if case.kind == "pair":
        return {"star": r["present_stripes"], "square": r["present_checker"], "mixing": r["mixing"],
                "joint": r["joint"]}
    if case.kind == "zigzag":
        return {"star": r["present_stripes"], "zigzag": r["zigzag"], "mixing": r["mixing"], "joint": r["joint"]}
    pattern = SUBJECTS[case.places[0][0]][1]
    return {"subject": r[f"present_{pattern}"], "mixing": r["mixing"], "joint": r["joint"]}


def per_seed(runs: list[dict], split: str, method: str, kind: str, metric: str, case: str | None = None) -> list:
    """The metric per seed (mean over the kind's cases, or one case), seeds in order."""
    seeds = sorted({r["seed"] for r in runs if r["split"] == split and r["method"] == method})
    out = []
    for seed in seeds:
        vals = [r[metric] for r in runs if r["split"] == split and r["method"] == method and r["seed"] == seed
                and r["case_kind"] == kind and (case is None or r["case"] == case)]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def _cell(values: list) -> str:
    if not values:
        return "-"
    s = mean_ci(values, bounds=(0.0, 1.0))
    return f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def _labels(runs: list[dict], split: str) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in runs if r["split"] == split))


def split_table(runs: list[dict], split: str) -> str:
    labels = _labels(runs, split)
    lines = ["| case kind | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for kind in KINDS:
        for metric, _ in METRICS[kind]:
            lines.append(f"| {kind} | {metric} | " + " | ".join(_cell(per_seed(runs, split, m, kind, metric))
                                                              for m in labels) + " |")
    return "\n".join(lines)


def _test(a: list, b: list) -> str:
    if not a or len(a) != len(b):
        return "n/a"
    t = paired_test(a, b)
    p = "n/a" if t["p"] is None else f"{t['p']:.3f}"
    return f"{t['diff']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}], p={p}"


def _label_of(runs: list[dict], method: str) -> str | None:
    return next((m for m in _labels(runs, "test") if m.split(" ")[0] == method), None)


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _target_row(runs: list[dict], label: str, alone: dict) -> dict:
    """One method's figures against the issue's targets (None: the method drew no such case)."""
    pair = {m: _mean(per_seed(runs, "test", label, "pair", m)) for m in ("star", "square", "mixing", "joint")}
    ratio = {s: pair[s] / alone[s] if pair[s] is not None and alone[s] else None for s in ("star", "square")}
    gaps = [abs(one - alone[s]) if one is not None and alone[s] is not None else None
            for one, s in ((_mean(per_seed(runs, "test", label, "one", "subject", c)), s)
                           for c, s in (("one_sks_any", "star"), ("one_v_any", "square")))]
    row = {"kind": "target", "method": label, "pair_joint": pair["joint"], "star_vs_alone": ratio["star"],
           "square_vs_alone": ratio["square"], "mixing": pair["mixing"],
           "zigzag_joint": _mean(per_seed(runs, "test", label, "zigzag", "joint")),
           "one_subject_gap": None if None in gaps else max(gaps)}

    def at_least(value, bound):
        return value is not None and value >= bound

    row["met"] = {"pair_joint>=0.70": at_least(row["pair_joint"], 0.70),
                  "each_subject>=0.8x_alone": all(at_least(v, 0.8) for v in ratio.values()),
                  "mixing<=0.05": row["mixing"] is not None and row["mixing"] <= 0.05,
                  "zigzag_joint>=0.70": at_least(row["zigzag_joint"], 0.70),
                  "one_subject_within_0.05": row["one_subject_gap"] is not None and row["one_subject_gap"] <= 0.05}
    return row


def targets(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """The issue's targets on the test split, each method's figures beside them (lines, json rows). The ceiling:
    each subject's expert alone on its own prompt (the test split's one-subject cases)."""
    alone = {"star": _mean(per_seed(runs, "test", "alone", "one", "subject", "one_sks_any")),
             "square": _mean(per_seed(runs, "test", "alone", "one", "subject", "one_v_any"))}
    lines, rows = [], []
    for label in _labels(runs, "test"):
        if label in ("base", "alone"):
            continue
        row = _target_row(runs, label, alone)
        rows.append(row)
        lines.append(f"| {label} | " + " | ".join(_fmt(row[k]) for k in ("pair_joint", "star_vs_alone",
                     "square_vs_alone", "mixing", "zigzag_joint", "one_subject_gap"))
                     + " | " + ", ".join(k for k, ok in row["met"].items() if ok) + " |")
    head = ["| method | pair joint (>= 0.70) | star / alone (>= 0.8) | square / alone (>= 0.8) | mixing (<= 0.05) "
            "| zigzag joint (>= 0.70) | one-subject gap to alone (<= 0.05) | targets met |", "|---|" + "---:|" * 6
            + "---|"]
    return head + lines, rows


def best_spatial(runs: list[dict]) -> str | None:
    """The spatial method with the best validation pair joint success (its test label), or None."""
    def val(method):
        labels = [m for m in _labels(runs, "validation") if m.split(" ")[0] == method]
        return max((np.mean(per_seed(runs, "validation", m, "pair", "joint") or [-1]) for m in labels), default=-1)

    present = [m for m in SPATIAL if _label_of(runs, m)]
    return _label_of(runs, max(present, key=val)) if present else None


def report(runs: list[dict], chosen: dict) -> tuple[str, list[dict]]:
    """The markdown (test table, targets, paired tests, validation table) and the json summary rows."""
    target_lines, rows = targets(runs)
    best = best_spatial(runs)
    lines = ["## Test split (reported)", "", split_table(runs, "test"), "", "### Targets (test split)", "",
             *target_lines, ""]
    if best:
        lines += [f"Best spatial method (chosen on validation pair joint success): `{best}`. Paired differences "
                  "over seeds, test split (95% CI, two-sided paired t-test):", "",
                  "| comparison | pair joint | zigzag joint | pair mixing |", "|---|---|---|---|"]
        for other in ("composite", "mole", "switch", "sum", "nla"):
            label = _label_of(runs, other)
            if label is None:
                continue
            cells = [_test(per_seed(runs, "test", best, k, m), per_seed(runs, "test", label, k, m))
                     for k, m in (("pair", "joint"), ("zigzag", "joint"), ("pair", "mixing"))]
            lines.append(f"| {best} vs {label} | " + " | ".join(cells) + " |")
            rows.append({"kind": "comparison", "a": best, "b": label,
                         **{f"{k}_{m}": paired_test(per_seed(runs, "test", best, k, m),
                                                    per_seed(runs, "test", label, k, m))
                            for k, m in (("pair", "joint"), ("zigzag", "joint"))}})
    lines += ["", "## Validation split (chooses the settings and the best spatial method)", "",
              split_table(runs, "validation"), "", f"Chosen: {chosen}.", "", "Metrics:", ""]
    lines += [f"- {kind} `{m}`: share of images with {what}" + (" (lower is better)" if m in LOWER_IS_BETTER else "")
              for kind in KINDS for m, what in METRICS[kind]]
    return "\n".join(lines), rows


def mask_picture(masks: dict | None, size: int = 64):
    """RGB picture of a method's regions: the first expert red, the second green, a third blue; gray when the
    method acts on the whole image."""
    from PIL import Image

    if masks is None:
        return Image.new("RGB", (size, size), (128, 128, 128))
    rgb = np.zeros((size, size, 3), dtype=np.float32)
    for channel, mask in enumerate(list(masks.values())[:3]):
        rgb[..., channel] = mask
    return Image.fromarray((rgb * 255).clip(0, 255).astype(np.uint8))


def grid_rows(images: dict, cases) -> tuple[list, list[str]]:
    """Rows (label, [image, mask picture per case]) of one seed's drawings, and the column captions."""
    labels = list(dict.fromkeys(label for case in cases for label in images[case.name]))
    rows = []
    for label in labels:
        row = []
        for case in cases:
            imgs, masks = images[case.name].get(label, ([None], None))
            blank = mask_picture(None)
            row += [imgs[0] if imgs[0] is not None else blank, mask_picture(masks[0] if masks else None)]
        rows.append((label[:20], row))
    columns = [text for case in cases for text in (case.prompt.replace("a photo of ", ""), "regions")]
    return rows, columns

