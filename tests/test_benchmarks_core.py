"""The core benchmark script runs end to end (no timing assertions: figures live in benchmarks/results)."""

import json

from benchmarks import layer_vs_peft


def test_layer_vs_peft_quick_run_writes_results(tmp_path):
    rows = layer_vs_peft.main(["--quick", "--out-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["peft_lora_ms"] > 0 and rows[0]["ours_moslora_ms"] > 0
    saved = json.loads((tmp_path / "layer_vs_peft_quick.json").read_text())
    assert saved["rows"] == rows and "torch" in saved["machine"]
    assert "moslora / PEFT" in (tmp_path / "layer_vs_peft_quick.md").read_text()
