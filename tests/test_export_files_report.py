"""Exports name every file a UI needs to draw the subject: the LoRA and, with pivotal tuning, the trigger word's
embedding `<word>.safetensors`, each with where it goes in AUTOMATIC1111 and ComfyUI (formats/ui_files.py)."""

from __future__ import annotations

from test_pivotal import WORD, pivotal_adapter

from moslora_diffusion.export import main


def _report(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_the_export_report_names_the_lora_and_the_trigger_words_embedding(tiny_sd15_dir, tmp_path, capsys):
    adapter = pivotal_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors")
    out = tmp_path / "out" / "subject.safetensors"
    report = _report(capsys, "--base", tiny_sd15_dir, "--adapter", adapter, "--to", "lora-kohya", "--out", out)
    assert "a UI needs these files together:" in report
    lora, embedding = (line for line in report.splitlines() if line.startswith("- "))
    assert lora.startswith(f"- {out}: the LoRA")
    assert embedding.startswith(f"- {out.parent / (WORD + '.safetensors')}: the trigger word `{WORD}`'s learned "
                                "embedding") and "does not draw the subject without it" in embedding
    assert (out.parent / f"{WORD}.safetensors").is_file()  # the file the report names exists
    assert "AUTOMATIC1111: copy into `embeddings/`" in report and "ComfyUI: copy into `models/embeddings/`" in report
    assert "`<lora:subject:1>`" in report and "models/loras/" in report


def test_a_plain_lora_or_a_merged_model_is_one_file(tiny_sd15_dir, tmp_path, capsys):
    from test_export_cli import _adapter

    plain = _adapter(tiny_sd15_dir, tmp_path / "plain.safetensors")
    report = _report(capsys, "--base", tiny_sd15_dir, "--adapter", plain, "--to", "lora-kohya", "--out",
                     tmp_path / "lora.safetensors")
    assert "a UI needs this file:" in report and "embedding" not in report
    pivotal = pivotal_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors")
    report = _report(capsys, "--base", tiny_sd15_dir, "--adapter", pivotal, "--to", "merged-single-file", "--out",
                     tmp_path / "merged.safetensors", "--dtype", "fp32")
    assert "a UI needs this file:" in report
    assert "models/Stable-diffusion/" in report and "models/checkpoints/" in report
    assert f"{WORD}.safetensors" not in report  # the vectors are baked into the checkpoint's text encoder


def test_a_diffusers_export_says_it_is_for_diffusers_not_that_a_ui_needs_it(tiny_sd15_dir, tmp_path, capsys):
    """It said "To draw the subject, a UI needs this file:" and then, for the same folder, "not for A1111" and "not
    for ComfyUI"."""
    from test_export_cli import _adapter

    plain = _adapter(tiny_sd15_dir, tmp_path / "plain.safetensors")
    out = tmp_path / "lora-folder"
    report = _report(capsys, "--base", tiny_sd15_dir, "--adapter", plain, "--to", "lora-diffusers", "--out", out)
    lines = report.strip().splitlines()
    assert lines[-2:] == ["For diffusers, not a UI (for AUTOMATIC1111 or ComfyUI, export --to lora-kohya (or "
                          "merged-single-file)):", f"- {out}: the LoRA (diffusers format): "
                          "pipe.load_lora_weights(folder)."]
    assert "a UI needs" not in report and "not for" not in report
