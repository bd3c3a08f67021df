"""The toy-world benchmarks end to end, shortened: 2 seeds, a few steps and images (quality on assets/toy-base;
MoLE and keep_best on a micro toy model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import quality, quality_metrics, quality_split, quality_targets
from moslora_diffusion.evaluation import stats


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory):
    from moslora_diffusion.toy.pretrain import PRESETS, pretrain

    out = tmp_path_factory.mktemp("toy-micro") / "model"
    torch.set_num_threads(1)
    pretrain(out, PRESETS["micro"], seed=0, device="cpu", log=lambda msg: None)
    return out


SHORT = ["--steps", "2", "--rank", "2", "--batch", "1", "--num-class-images", "2", "--n-images", "3",
         "--gen-steps", "2", "--threads", "1"]


REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["baseline", "lora", "min_snr"]  # recipes whose TrainConfig fields exist in every version


def test_quality_benchmark_short_run_reports_both_splits(tmp_path):
    """On assets/toy-base: seeds 0 and 1 run as two parts (as two processes would), then merged into one report
    with per-split summaries, paired differences against the reference, targets on test and validation's choices."""
    grid = tmp_path / "grid.png"
    common = ["--base", str(REPO / "assets" / "toy-base"), "--seeds", "1", "--out-dir", str(tmp_path / "parts"),
              "--variants", *VARIANTS, *SHORT]
    part0 = quality.main([*common, "--seed-start", "0", "--name", "part0", "--grid", str(grid)])
    part1 = quality.main([*common, "--seed-start", "1", "--name", "part1"])
    parts = [tmp_path / "parts" / f"part{i}.json" for i in (0, 1)]
    result = quality.main(["--merge", *map(str, parts), "--out-dir", str(tmp_path), "--grid", str(grid)])
    assert result["runs"] == part0["runs"] + part1["runs"]
    assert result["settings"]["seed_list"] == [0, 1]
    assert result["settings"]["recipes"]["min_snr"] == {"snr_gamma": 5.0}
    saved = json.loads((tmp_path / "quality.json").read_text())
    rows = saved["rows"]
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted((v, s) for v in VARIANTS for s in range(2))
    metrics = [name for name, _, _ in quality_metrics.METRICS]
    base = next(r for r in rows if r["kind"] == "base_model")
    for r in runs + [base]:
        for split in quality_split.SPLITS:
            for m in metrics:
                assert math.isfinite(r[split][m]) and 0.0 <= r[split][m] <= 1.0, (split, m, r[split][m])
    assert base["validation"]["prior_agreement"] == base["test"]["prior_agreement"] == 1.0  # base vs itself
    summaries = {(r["split"], r["variant"]): r for r in rows if r["kind"] == "summary"}
    assert set(summaries) == {(s, v) for s in quality_split.SPLITS for v in VARIANTS}
    for summary in summaries.values():
        for m in metrics:
            stats = summary[m]
            assert stats["ci_low"] - 1e-12 <= stats["mean"] <= stats["ci_high"] + 1e-12 and stats["n"] == 2
    comparisons = {(r["split"], r["comparison"]) for r in rows if r["kind"] == "comparison"}
    assert comparisons == {(s, f"{v}_vs_baseline") for s in quality_split.SPLITS for v in ("lora", "min_snr")}
    chosen = next(r for r in rows if r["kind"] == "chosen_on_validation")
    picks = {k: v for k, v in chosen.items() if k not in ("kind", "recipe")}
    assert set(picks) == set(quality_targets.TARGETS) and set(picks.values()) <= set(VARIANTS)
    assert chosen["recipe"] in VARIANTS
    table = (tmp_path / "quality.md").read_text()
    for heading in ("## Test split", "## Validation split", "Targets on the test split", "Chosen on validation"):
        assert heading in table
    assert "variant - baseline" in table and "validation scenes [" in table and "test scenes [" in table
    from PIL import Image

    assert grid.is_file() and Image.open(grid).size[1] > 64 * (1 + len(VARIANTS))


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path):
    def part(name: str, seed: int, steps: int, variant: str = "lora", lr: float = 1e-3) -> Path:
        rows = [{"kind": "settings", "variants": [variant], "recipes": {variant: {"learning_rate": lr}},
                 "reference": "lora", "steps": steps, "seeds": 1, "seed_list": [seed], "total_seconds": 1.0},
                {"kind": "base_model"}, {"kind": "run", "variant": variant, "seed": seed}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"machine": {}, "rows": rows}))
        return path

    with pytest.raises(SystemExit, match="other settings: steps"):
        quality.main(["--merge", str(part("a", 0, 10)), str(part("b", 1, 20)), "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="share"):
        quality.main(["--merge", str(part("c", 0, 10)), str(part("d", 0, 10)), "--out-dir", str(tmp_path)])
    # recipes added in a later part must have been run with the same seeds as the others
    with pytest.raises(SystemExit, match="lacks some seeds"):
        quality.main(["--merge", str(part("e", 0, 10)), str(part("f", 1, 10, "baseline")), "--out-dir",
                      str(tmp_path)])
    with pytest.raises(SystemExit, match="recipe 'lora' has other settings"):
        quality.main(["--merge", str(part("g", 0, 10)), str(part("h", 1, 10, lr=2e-3)), "--out-dir", str(tmp_path)])
    assert not (tmp_path / "quality.json").exists()


def test_statistics_match_reference_values():
    # Student's t: 97.5% quantiles for df 1, 4, 30 (tables) and a two-sided tail.
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)
    assert stats.t_sf_two_sided(2.776, 4) == pytest.approx(0.05, abs=1e-3)
    ci = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ci["mean"] == 3.0 and ci["ci_high"] - 3.0 == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), 1e-3)
    same = stats.paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["p"] == 1.0 and not same["significant"]
    shifted = stats.paired_test([0.9, 0.8, 0.95, 0.85, 0.9], [0.1, 0.2, 0.15, 0.1, 0.2])
    assert shifted["significant"] and shifted["p"] < 1e-4


def test_mole_benchmark_short_run_scores_every_method_and_seed(micro_base, tmp_path):
    """The MoLE composition benchmark end to end on the micro toy model (the figures: benchmarks/results)."""
    from PIL import Image

    from benchmarks import mole_toy

    result = mole_toy.main(["--base", str(micro_base), "--seeds", "2", "--expert-steps", "2", "--background-steps",
                            "2", "--gate-steps", "2", "--gate-batch", "1", "--n-images", "2", "--gen-steps", "2",
                            "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)])
    runs = result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in mole_toy.METHODS for s in (0, 1))
    for run in runs:
        assert all(0.0 <= run[name] <= 1.0 for name, _, _ in mole_toy.METRICS)
    static = [r for r in runs if r["method"] == "mole_static"]
    assert all(math.isfinite(r["static_gap_latents"]) for r in static)
    assert set(result["comparisons"]) == {f"{a}_vs_{b}" for a, b in mole_toy.COMPARISONS}
    assert Image.open(result["grid"]).size[1] > 64 * len(mole_toy.METHODS)
    table = (tmp_path / "mole_toy.md").read_text()
    assert all(name in table for name, _, _ in mole_toy.METRICS)


def test_keep_best_benchmark_short_run_compares_best_and_last(micro_base, tmp_path):
    """The --keep_best record end to end on the micro toy model (the figures: benchmarks/results/keep_best.md)."""
    from benchmarks import keep_best

    result = keep_best.main(["--base", str(micro_base), "--seeds", "1", "--steps", "4", "--validation-steps", "2",
                             "--validation-images", "2", "--prompts", "2", "--eval-seeds", "1", "--gen-steps", "2",
                             "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)])
    (run,) = result["runs"]
    assert [v["step"] for v in run["validation"]] == [2, 4]  # scored at every validation step
    assert set(run["heldout"]) == {"best", "last"}
    assert {row["metric"] for row in result["summary"]} == {"toy_subject", "toy_prompt"}
    assert (tmp_path / "work" / "run-seed0" / "moslora_best.safetensors").is_file()
    assert "best - last" in (tmp_path / "keep_best.md").read_text()


def test_class_object_rate_counts_class_images_that_draw_an_object():
    """The quality benchmark's measure of the class-prompt loss: an empty background is no object."""
    from PIL import Image

    from moslora_diffusion.toy.world import COLOURS, Scene, render

    star = render(Scene("star", "red", "large", "center", "blue", "plain"))
    empty = Image.new("RGB", (64, 64), tuple(COLOURS["blue"]))
    metrics = quality_metrics.class_metrics([star, empty, empty, star], [star] * 4)
    assert metrics["class_object_rate"] == 0.5
    assert quality_metrics.class_metrics([star] * 2, [star] * 2)["class_object_rate"] == 1.0


def test_merging_parts_recorded_before_a_metric_existed_says_so(tmp_path):
    """The recorded results predate class_object_rate: merging them is one line, not a KeyError."""
    from benchmarks.quality_report import merge_parts

    rows = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())["rows"]
    shared = [r for r in rows if r["kind"] in ("settings", "base_model")]
    parts = []
    for name, seeds in (("a", {0, 1, 2}), ("b", {3, 4})):
        mine = shared + [r for r in rows if r["kind"] == "run" and r["seed"] in seeds]
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps({"rows": mine}))
    with pytest.raises(SystemExit, match="a part has no class_object_rate"):
        merge_parts(parts, tmp_path, "merged", None)
