"""The core benchmark script runs end to end (no timing assertions: figures live in benchmarks/results)."""

import json

from benchmarks import layer_vs_peft


def test_layer_vs_peft_quick_run_writes_results(tmp_path):
    rows = layer_vs_peft.main(["--quick", "--out-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["peft_lora_ms"] > 0 and rows[0]["ours_moslora_ms"] > 0
    saved = json.loads((tmp_path / "layer_vs_peft_quick.json").read_text())
    assert saved["rows"] == rows and "torch" in saved["machine"]
    assert "moslora / PEFT" in (tmp_path / "layer_vs_peft_quick.md").read_text()


def test_train_step_quick_run_writes_results(tmp_path):
    from benchmarks import train_step

    rows = train_step.main(["--size", "tiny", "--rounds", "1", "--steps-per-round", "1", "--resolution", "32",
                            "--checkpointing", "on", "--out-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["gradient_checkpointing"] is True
    assert all(rows[0][f"{v}_s"] > 0 and rows[0][f"{v}_peak_mib"] > 0 for v in train_step.VARIANTS)
    assert (tmp_path / "train_step_sd15_tiny.md").is_file()
