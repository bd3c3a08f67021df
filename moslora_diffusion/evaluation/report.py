"""The evaluation report: means with 95% t intervals per adapter, subject and prompt, paired differences between
adapters, as JSON and markdown, and a contact sheet of the images.

Units: a cell is one (subject, prompt), its value the mean over its seeds. An adapter's overall mean and interval
are taken over its cells, a subject's over its prompts' cells, a prompt's over its images (all subjects and
seeds). Two adapters are compared by a paired t-test over the cells both have (same prompts, same seeds).
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files.atomic import atomic_write, save_image
from .stats import mean_ci, paired_test

BOUNDS = (-1.0, 1.0)  # every metric is a cosine similarity or a share: never outside [-1, 1]


def _prompt_key(row: dict, token: str) -> str:
    """DreamBench prompts grouped across subjects: "a sks dog in the snow" -> "a {token} {class} in the snow"."""
    if row["class"]:
        return row["prompt"].replace(f"{token} {row['class']}", "{token} {class}")
    return row["prompt"]


def _cells(rows: list[dict], metric: str) -> dict[str, dict[tuple[str, str], float]]:
    """adapter -> {(subject, prompt): mean over seeds}."""
    grouped = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row["adapter"]][(row["subject"], row["prompt"])].append(row[metric])
    return {a: {cell: float(np.mean(v)) for cell, v in cells.items()} for a, cells in grouped.items()}


def summarise(rows: list[dict], metrics: list[str], token: str) -> dict:
    """{"adapters": {adapter: {"overall", "subjects", "prompts"}}, "paired": {"A - B": {metric: test}}}."""
    adapters = list(dict.fromkeys(row["adapter"] for row in rows))
    result = {"adapters": {a: {"overall": {}, "subjects": defaultdict(dict), "prompts": defaultdict(dict)}
                           for a in adapters}, "paired": {}}
    for metric in metrics:
        cells = _cells(rows, metric)
        for adapter in adapters:
            block = result["adapters"][adapter]
            block["overall"][metric] = mean_ci(list(cells[adapter].values()), bounds=BOUNDS)
            by_subject, by_prompt = defaultdict(list), defaultdict(list)
            for (subject, _), value in cells[adapter].items():
                by_subject[subject].append(value)
            for row in rows:
                if row["adapter"] == adapter:
                    by_prompt[_prompt_key(row, token)].append(row[metric])
            for subject, values in by_subject.items():
                block["subjects"][subject][metric] = mean_ci(values, bounds=BOUNDS)
            for prompt, values in by_prompt.items():
                block["prompts"][prompt][metric] = mean_ci(values, bounds=BOUNDS)
        for a, b in combinations(adapters, 2):
            shared = sorted(set(cells[a]) & set(cells[b]))
            test = paired_test([cells[a][c] for c in shared], [cells[b][c] for c in shared])
            result["paired"].setdefault(f"{a} - {b}", {})[metric] = test
    for block in result["adapters"].values():
        block["subjects"], block["prompts"] = dict(block["subjects"]), dict(block["prompts"])
    return result


def _ci(entry: dict) -> str:
    return f"{entry['mean']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def markdown(summary: dict, metrics: list[str], settings: dict) -> str:
    """report.md: settings, the reference photos per subject, means, paired differences, per subject and prompt."""
    head = " | ".join(metrics)
    settings = dict(settings)
    references = settings.pop("references", {})
    lines = ["# Evaluation", "", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    if references:
        lines += [f"References of {subject}: {', '.join(names)}" for subject, names in references.items()] + [""]
    lines += ["Mean [95% t interval] over (subject, prompt) cells, each the mean over its seeds.", "",
              f"| adapter | {head} |", "|---|" + "---:|" * len(metrics)]
    for adapter, block in summary["adapters"].items():
        lines.append(f"| {adapter} | " + " | ".join(_ci(block["overall"][m]) for m in metrics) + " |")
    if summary["paired"]:
        lines += ["", "## Paired differences (over the cells both adapters have)", "",
                  f"| difference | {head} |", "|---|" + "---:|" * len(metrics)]
        for pair, tests in summary["paired"].items():
            cells = [f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], p = "
                     + ("n/a" if t["p"] is None else f"{t['p']:.3g}") for t in (tests[m] for m in metrics)]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    for title, key in (("subject", "subjects"), ("prompt", "prompts")):
        lines += ["", f"## Per {title}", "", f"| {title} | adapter | {head} |", "|---|---|" + "---:|" * len(metrics)]
        names = list(dict.fromkeys(n for block in summary["adapters"].values() for n in block[key]))
        for name in names:
            for adapter, block in summary["adapters"].items():
                if name in block[key]:
                    lines.append(f"| {name} | {adapter} | " + " | ".join(_ci(block[key][name][m]) for m in metrics)
                                 + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], metrics: list[str], token: str, settings: dict) -> dict:
    """Writes report.json (settings, summary, every image's scores) and report.md; returns the summary."""
    summary = summarise(rows, metrics, token)
    text = json.dumps({"settings": settings, "metrics": metrics, **summary, "images": rows}, indent=1) + "\n"
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    md = markdown(summary, metrics, settings)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(md, encoding="utf-8"))
    return summary


def contact_sheet(rows: list[dict], images_dir: Path, path: Path, thumb: int = 96, max_rows: int = 30) -> Path:
    """A PNG: one row per (subject, prompt) (the first `max_rows`), one column per (adapter, seed), the prompt
    written at the left, the first metric under each image."""
    cells = list(dict.fromkeys((r["subject"], r["prompt"]) for r in rows))[:max_rows]
    columns = list(dict.fromkeys((r["adapter"], r["seed"]) for r in rows))
    by_key = {(r["subject"], r["prompt"], r["adapter"], r["seed"]): r for r in rows}
    metric = next((k for k in rows[0] if k not in ("adapter", "subject", "class", "prompt", "seed", "path")), None)
    text_w, label_h = 220, 14
    sheet = Image.new("RGB", (text_w + thumb * len(columns), label_h + (thumb + label_h) * len(cells)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (adapter, seed) in enumerate(columns):
        draw.text((text_w + c * thumb + 2, 1), f"{adapter[:12]} s{seed}", fill="black")
    for r, (subject, prompt) in enumerate(cells):
        y = label_h + r * (thumb + label_h)
        draw.multiline_text((2, y + 2), "\n".join(textwrap.wrap(f"{subject}: {prompt}", 34)[:6]), fill="black")
        for c, (adapter, seed) in enumerate(columns):
            row = by_key.get((subject, prompt, adapter, seed))
            if row is None:
                continue
            with Image.open(images_dir / row["path"]) as image:
                sheet.paste(image.convert("RGB").resize((thumb, thumb)), (text_w + c * thumb, y))
            if metric:
                draw.text((text_w + c * thumb + 2, y + thumb), f"{metric} {row[metric]:.2f}", fill="black")
    return save_image(sheet, path)
