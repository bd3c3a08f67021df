"""The whole-run benchmark runs end to end on the tiny model (no timing assertions: figures live in
benchmarks/results)."""

import json

import pytest

from benchmarks import whole_run


def test_whole_run_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        whole_run.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--steps", "--resolution", "--rank", "--device", "--out-dir", "--repeats"):
        assert option in text


def test_whole_run_tiny_writes_both_timings_and_ratios(tmp_path):
    rows = whole_run.main(["--model", "tiny", "--steps", "3", "--repeats", "1", "--warmup-steps", "0",
                           "--num-class-images", "3", "--device", "cpu", "--report-to", "none",
                           "--out-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path)])
    by = {row["variant"]: row for row in rows}
    assert set(by) == set(whole_run.VARIANTS)
    assert all(row["wall_s"] > 0 and row["loop_s"] > 0 and row["steps"] == 3 for row in rows)
    assert by["ours"]["ratio_vs_peer"] > 0 and by["ours_cached"]["ratio_vs_peer"] > 0
    assert by["ours_cached"]["ratio_vs_ours_default"] > 0 and by["ours"]["cpu_ratio_vs_peer"] > 0
    # First runs start from an empty latent cache; the rerun finds every posterior of the earlier run.
    assert by["ours"]["vae_rows_encoded"] >= 4 and by["ours_cached"]["vae_rows_encoded"] >= 4
    assert by["ours_rerun"]["vae_rows_encoded"] == 0 and by["ours_rerun"]["ratio_vs_ours_default"] > 0
    saved = json.loads((tmp_path / "results" / "whole_run.json").read_text())
    assert saved["rows"] == rows and "torch" in saved["machine"]
    assert "ours / peer" in (tmp_path / "results" / "whole_run.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # the work folder was removed
