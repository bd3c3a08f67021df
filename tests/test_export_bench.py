"""The export benchmark runs end to end on tiny models (no timing assertions: figures live in benchmarks/results)."""

import json

from benchmarks import export_bench


def test_export_bench_tiny_run_writes_results(tmp_path):
    rows = export_bench.main(["--size", "tiny", "--out-dir", str(tmp_path)])
    assert [(r["family"], r["dtype"]) for r in rows] == export_bench.CASES["tiny"]
    assert all(r["export_s"] > 0 and r["file_GiB"] > 0 and r["peak_rss_GiB"] > 0 for r in rows)
    saved = json.loads((tmp_path / "export_tiny.json").read_text())
    assert saved["rows"] == rows and "torch" in saved["machine"]
    assert "peak RSS" in (tmp_path / "export_tiny.md").read_text()
