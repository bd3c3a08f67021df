"""The composition benchmark's cases (disjoint splits, layouts, regions) and its report's arithmetic."""

from __future__ import annotations

import numpy as np

from benchmarks.compose_toy_cases import SPLITS
from benchmarks.compose_toy_report import best_spatial, per_seed, seed_metrics, targets


def test_splits_are_disjoint_and_cover_both_axes_orders_and_places():
    prompts = {split: {c.prompt for c in cases} for split, cases in SPLITS.items()}
    assert not prompts["validation"] & prompts["test"]
    for cases in SPLITS.values():
        pairs = [c for c in cases if c.kind == "pair"]
        assert {dict(c.places)["sks"] for c in pairs} == {"left", "right", "top", "bottom"}
        assert {c.prompt.split()[3] for c in pairs} == {"sks", "v"}  # either subject named first
        assert {c.kind for c in cases} == {"pair", "zigzag", "one"}
    test_pair = next(c for c in SPLITS["test"] if c.name == "pair_left_v")
    assert test_pair.prompt == "a photo of v square on the right and sks star on the left"
    specs = test_pair.region_specs(region_prompts=True)
    assert [(s["expert"], s["box"], s["prompt"]) for s in specs] == [
        ("sks", (0.0, 0.0, 0.5, 1.0), "a photo of sks star"),  # what is in the region; the box says where
        ("v", (0.5, 0.0, 1.0, 1.0), "a photo of v square")]
    zig = next(c for c in SPLITS["test"] if c.kind == "zigzag")
    assert [s["expert"] for s in zig.region_specs(False)] == ["sks"]  # the zigzag takes no region:
    assert zig.background == "z" and test_pair.background is None  # it is the background


def test_case_metrics_on_rendered_ground_truth():
    from moslora_diffusion.toy.pairs import make_pair, place, render_pair
    from moslora_diffusion.toy.subject import SUBJECT, SUBJECT_2

    case = next(c for c in SPLITS["test"] if c.name == "pair_top_v")  # sks star at the top, v square at the bottom
    right = render_pair(make_pair(place("star", "yellow", "top", 24, "blue", fill=SUBJECT.fill),
                                  place("square", "red", "bottom", 24, "blue", fill=SUBJECT_2.fill)))
    swapped = render_pair(make_pair(place("star", "yellow", "bottom", 24, "blue", fill=SUBJECT.fill),
                                    place("square", "red", "top", 24, "blue", fill=SUBJECT_2.fill)))
    assert seed_metrics(case, [right, right, swapped, swapped]) == {"star": 0.5, "square": 0.5, "mixing": 0.5,
                                                                     "joint": 0.5}


def _rows(method, split, kind, case, values, metric="joint"):
    return [{"split": split, "seed": s, "method": method, "case_kind": kind, "case": case, metric: v}
            for s, v in enumerate(values)]


def test_targets_and_best_spatial_follow_the_rows():
    runs = []
    for method, joint in (("regional", [0.8, 0.9]), ("mole", [0.0, 0.1])):
        for split in ("validation", "test"):
            for metric, vals in (("joint", joint), ("star", [1.0, 1.0]), ("square", [0.9, 0.9]),
                                 ("mixing", [0.0, 0.0])):
                for row in _rows(method, split, "pair", "p", vals, metric):
                    runs.append(row)
            runs += _rows(method, split, "zigzag", "z", joint)
            runs += _rows(method, split, "one", "one_sks_any", [0.9, 0.9], "subject")
            runs += _rows(method, split, "one", "one_v_any", [0.7, 0.9], "subject")
    for metric in ("joint", "star", "square", "mixing"):  # no one-subject or zigzag rows
        runs += _rows("auto", "test", "pair", "p", [0.5, 0.5], metric)
    runs += _rows("alone", "test", "one", "one_sks_any", [1.0, 1.0], "subject")
    runs += _rows("alone", "test", "one", "one_v_any", [0.8, 0.8], "subject")
    merged = {}
    for r in runs:  # one row per (split, seed, method, case), as the benchmark writes them
        merged.setdefault((r["split"], r["seed"], r["method"], r["case"]), {}).update(r)
    runs = list(merged.values())
    assert per_seed(runs, "test", "regional", "pair", "joint") == [0.8, 0.9]
    assert best_spatial(runs) == "regional"
    _, rows = targets(runs)
    regional = next(r for r in rows if r["method"] == "regional")
    assert np.isclose(regional["pair_joint"], 0.85) and np.isclose(regional["square_vs_alone"], 0.9 / 0.8)
    assert np.isclose(regional["one_subject_gap"], 0.1)  # max(|0.9 - 1.0|, |mean(0.7, 0.9) - 0.8|)
    assert regional["met"]["pair_joint>=0.70"] and not regional["met"]["one_subject_within_0.05"]
    assert not next(r for r in rows if r["method"] == "mole")["met"]["pair_joint>=0.70"]
    auto = next(r for r in rows if r["method"] == "auto")
    assert auto["one_subject_gap"] is None and auto["zigzag_joint"] is None
    assert not auto["met"]["one_subject_within_0.05"] and not auto["met"]["zigzag_joint>=0.70"]


def test_compose_benchmark_short_run_in_parallel_parts_then_merged(tmp_path):
    """The composition benchmark end to end on the micro toy model: experts once, the two splits as parts, the
    merged report (the figures: benchmarks/results/compose_toy.md)."""
    import json

    import torch

    from benchmarks import compose_toy
    from moslora_diffusion.composition import METHODS
    from moslora_diffusion.toy.pretrain import PRESETS, pretrain

    base = tmp_path / "base"
    torch.set_num_threads(1)
    pretrain(base, PRESETS["micro"], seed=0, device="cpu", log=lambda msg: None)
    common = ["--base", str(base), "--seeds", "2", "--val-seeds", "1", "--expert-steps", "2", "--background-steps",
              "2", "--gate-steps", "2", "--gate-batch", "1", "--n-images", "2", "--gen-steps", "4", "--threads", "1",
              "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path),
              "--methods", "sum", "switch", "composite", "regional", "auto", "spatial_mole"]  # gates: spatial only
    compose_toy.main(common + ["--experts-only"])
    compose_toy.main(common + ["--splits", "validation", "--name", "part_v"])
    compose_toy.main(common + ["--splits", "test", "--name", "part_t"])
    result = compose_toy.main(["--merge", str(tmp_path / "part_v.json"), str(tmp_path / "part_t.json"),
                               "--out-dir", str(tmp_path), "--name", "merged"])
    test_methods = {r["method"].split(" ")[0] for r in result["runs"] if r["split"] == "test"}
    assert test_methods == set(METHODS) - {"nla", "mole"} | {"base", "alone"}
    labels = {r["method"] for r in result["runs"] if r["split"] == "test" and r["method"].startswith("regional")}
    assert len(labels) == 1  # the setting chosen on validation, the other dropped
    assert {(r["seed"], r["split"]) for r in result["runs"]} == {(0, "validation"), (0, "test"), (1, "test")}
    rows = json.loads((tmp_path / "merged.json").read_text())["rows"]
    assert {r["method"] for r in rows if r.get("kind") == "target"} >= {"composite", "spatial_mole"}
    assert (tmp_path / "part_t_grid.png").is_file() and "Test split" in (tmp_path / "merged.md").read_text()
