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


def test_train_step_float8_variant_runs_under_bf16_and_leaves_the_unet_as_it_was(tmp_path):
    import pytest
    import torch

    from benchmarks import train_step

    rows = train_step.main(["--size", "tiny", "--rounds", "1", "--steps-per-round", "1", "--resolution", "32",
                            "--checkpointing", "on", "--dtype", "bf16", "--no-memory", "--variants", "ours_moslora",
                            "ours_moslora_fp8", "--out-dir", str(tmp_path)])
    assert rows[0]["ours_moslora_fp8_s"] > 0 and (tmp_path / "train_step_sd15_tiny_bf16.md").is_file()
    with pytest.raises(SystemExit):  # float8 weights need autocast
        train_step.parse_args(["--variants", "ours_moslora_fp8", "--dtype", "fp32"])

    unet = train_step.build_unet("sd15", "tiny", torch.bfloat16, "cpu")
    before = {name: p.clone() for name, p in unet.named_parameters()}
    _, undo = train_step.attach_variant(unet, "ours_moslora_fp8", 4)
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn
    undo()
    after = dict(unet.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_train_step_compiled_variant_runs_and_leaves_the_unet_uncompiled(tmp_path):
    """Two rounds, so the second compiles again after the first's undo; aot_eager traces what inductor would
    compile without its minutes of C++ builds."""
    import torch

    from benchmarks import train_step

    rows = train_step.main(["--size", "tiny", "--rounds", "2", "--steps-per-round", "1", "--resolution", "32",
                            "--checkpointing", "on", "--no-memory", "--variants", "ours_moslora",
                            "ours_moslora_compiled", "--dynamo-backend", "aot_eager", "--name", "compiled_smoke",
                            "--out-dir", str(tmp_path)])
    row = rows[0]
    assert row["ours_moslora_compiled_s"] > 0 and row["ours_moslora_compiled_first_step_s"] > 0
    assert row["ours_moslora_compiled_aten_ops"] is None and row["ours_moslora_aten_ops"] > 0
    assert "the compile:" in (tmp_path / "compiled_smoke.md").read_text()

    unet = train_step.build_unet("sd15", "tiny", torch.float32, "cpu")
    _, undo = train_step.attach_variant(unet, "ours_moslora_compiled", 4, dynamo_backend="aot_eager")
    assert unet._compiled_call_impl is not None
    undo()
    assert unet._compiled_call_impl is None and not any("lora" in name for name, _ in unet.named_parameters())


def test_mole_cost_quick_run_writes_every_variant(tmp_path):
    """The MoLE cost benchmark end to end on the tiny model (the figures are its results file, not this test)."""
    from benchmarks import mole_cost

    rows = mole_cost.main(["--size", "tiny", "--resolution", "64", "--train-resolution", "32", "--repeats", "1",
                           "--name", "mole_cost_quick", "--out-dir", str(tmp_path)])
    generation = {r["variant"]: r for r in rows if r["kind"] == "generation"}
    assert set(generation) == {"base", "mole_dynamic", "mole_static"}
    assert generation["base"]["unet_ratio"] == 1.0 and generation["mole_dynamic"]["unet_step_s"] > 0
    assert {r["variant"] for r in rows if r["kind"] == "training"} == {"dreambooth_step", "gate_step"}
    saved = json.loads((tmp_path / "mole_cost_quick.json").read_text())
    assert saved["rows"][-1]["kind"] == "summary" and saved["rows"][-1]["gate_parameters"] > 0
