"""The export command: every target on a tiny model, and each bad input as a one-line error (exit 2)
that leaves nothing behind: no partial output, no temporary file."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple

import pytest
from conftest import randomize_adapters
from safetensors import safe_open

from moslora_diffusion import AdapterConfig, attach_to_pipeline, save_adapter
from moslora_diffusion.export import main
from moslora_diffusion.models.loading import load_pipeline


def _adapter(base_dir, path):
    pipe = load_pipeline(base_dir)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8), text_targets="attn")
    randomize_adapters(pipe)
    return save_adapter(pipe, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_sd15_dir):
    """A training output folder as the trainer writes it (only the file export reads matters)."""
    folder = tmp_path_factory.mktemp("cli") / "run-sks"
    folder.mkdir()
    _adapter(tiny_sd15_dir, folder / "moslora.safetensors")
    return folder


@pytest.fixture(scope="module")
def sdxl_adapter(tmp_path_factory, tiny_sdxl_dir):
    return _adapter(tiny_sdxl_dir, tmp_path_factory.mktemp("cli-xl") / "xl.safetensors")


def _cli(base, adapter, target, out, *extra):
    return main(["--base", str(base), "--adapter", str(adapter), "--to", target, "--out", str(out), *extra])


def _fails_with(capsys, message, *args):
    with pytest.raises(SystemExit) as exit_info:
        _cli(*args)
    err = capsys.readouterr().err  # may hold diffusers' loading progress bars before the error
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert last.startswith("error: ") and message in last and "Traceback" not in err
    return last


@pytest.mark.parametrize("target, out_name, written", [
    ("lora-diffusers", "lora", "lora/pytorch_lora_weights.safetensors"),
    ("lora-kohya", "sks.safetensors", "sks.safetensors"),
    ("merged-diffusers", "merged", "merged/model_index.json"),
    ("merged-single-file", "sks-merged.safetensors", "sks-merged.safetensors"),
])
def test_each_target_writes_its_output(tiny_sd15_dir, run_dir, tmp_path, capsys, target, out_name, written):
    assert _cli(tiny_sd15_dir, f"{run_dir}:0.8", target, tmp_path / out_name) == 0
    assert (tmp_path / written).is_file()
    assert f"wrote {tmp_path / out_name}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [out_name]  # no temporary file or folder left


def test_outputs_record_the_merge(tiny_sd15_dir, run_dir, tmp_path):
    _cli(tiny_sd15_dir, f"{run_dir}:0.8", "merged-diffusers", tmp_path / "merged", "--dtype", "fp32")
    record = json.loads((tmp_path / "merged" / "moslora_merge.json").read_text())
    assert record["adapters"][0]["name"] == "run-sks" and record["adapters"][0]["scale"] == 0.8
    _cli(tiny_sd15_dir, run_dir, "lora-kohya", tmp_path / "k.safetensors")
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)  # SD 1.x: diffusers names
    assert meta["ss_network_alpha"] == "8.0"


def test_adapter_for_another_family(tiny_sd15_dir, sdxl_adapter, tmp_path, capsys):
    _fails_with(capsys, "trained for sdxl", tiny_sd15_dir, sdxl_adapter, "merged-single-file",
                tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_scale_not_a_number(tiny_sd15_dir, run_dir, tmp_path, capsys):
    _fails_with(capsys, "scale not a number", tiny_sd15_dir, f"{run_dir}:strong", "lora-kohya",
                tmp_path / "x.safetensors")


def test_a_scale_of_0_is_refused_before_anything_is_written(tiny_sd15_dir, run_dir, tmp_path, capsys):
    """`--adapter run:0` wrote a LoRA of zeros without a word."""
    _fails_with(capsys, "at scale 0 would export nothing of it: give a scale other than 0", tiny_sd15_dir,
                f"{run_dir}:0", "lora-kohya", tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_mole_folder_is_sent_to_mole_export(tiny_sd15_dir, tmp_path, capsys):
    """It read "has no moslora.safetensors (is it a training output folder?)": it is one, of gates."""
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "mole.safetensors").write_bytes(b"not read")
    _fails_with(capsys, f"{gates} holds a MoLE (mole.safetensors), not an adapter: export it with `python -m "
                f"moslora_diffusion.mole export --mole {gates} --to ...`", tiny_sd15_dir, gates, "lora-kohya",
                tmp_path / "x.safetensors")


def test_missing_adapter_file(tiny_sd15_dir, tmp_path, capsys):
    _fails_with(capsys, "adapter file not found", tiny_sd15_dir, tmp_path / "nope.safetensors", "lora-kohya",
                tmp_path / "x.safetensors")
    _fails_with(capsys, "no moslora.safetensors", tiny_sd15_dir, tmp_path, "lora-kohya", tmp_path / "x.safetensors")


def test_unwritable_output_location(tiny_sd15_dir, run_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        _fails_with(capsys, "permission denied", tiny_sd15_dir, run_dir, "merged-single-file",
                    locked / "sub" / "x.safetensors")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_output_under_a_file(tiny_sd15_dir, run_dir, tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    _fails_with(capsys, "is a file, not a folder", tiny_sd15_dir, run_dir, "merged-diffusers", tmp_path / "plain" / "m")


@pytest.mark.parametrize("target, out_name", [("merged-single-file", "m.safetensors"), ("merged-diffusers", "m"),
                                              ("lora-kohya", "k.safetensors")])
def test_not_enough_disk_space(tiny_sd15_dir, run_dir, tmp_path, capsys, monkeypatch, target, out_name):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    _fails_with(capsys, "not enough free disk space", tiny_sd15_dir, run_dir, target, tmp_path / out_name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target, out_name, probe", [
    ("merged-single-file", "m.safetensors", "m.safetensors"),
    ("merged-diffusers", "m", "m/model_index.json"),
    ("lora-diffusers", "l", "l/pytorch_lora_weights.safetensors"),
])
def test_existing_output_needs_overwrite(tiny_sd15_dir, run_dir, tmp_path, capsys, target, out_name, probe):
    _cli(tiny_sd15_dir, f"{run_dir}:0.5", target, tmp_path / out_name)
    before = (tmp_path / probe).read_bytes()
    _fails_with(capsys, "pass --overwrite", tiny_sd15_dir, run_dir, target, tmp_path / out_name)
    assert (tmp_path / probe).read_bytes() == before
    assert _cli(tiny_sd15_dir, run_dir, target, tmp_path / out_name, "--overwrite") == 0
    assert [p.name for p in tmp_path.iterdir()] == [out_name]


def test_failure_while_writing_a_folder_leaves_nothing(tiny_sd15_dir, run_dir, tmp_path, monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    def half_written(self, folder, **kwargs):
        (folder / "unet").mkdir()
        (folder / "unet" / "partial.safetensors").write_bytes(b"\0" * 10)
        raise RuntimeError("disk went away")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", half_written)
    with pytest.raises(SystemExit) as exit_info:  # unexpected: one line, exit status 1 (console/exits.py)
        _cli(tiny_sd15_dir, run_dir, "merged-diffusers", tmp_path / "m")
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: unexpected RuntimeError: disk went away (a bug; run again with --debug")
    assert list(tmp_path.iterdir()) == []


def test_single_file_out_must_be_safetensors(tiny_sd15_dir, run_dir, tmp_path, capsys):
    _fails_with(capsys, "ending in .safetensors", tiny_sd15_dir, run_dir, "merged-single-file", tmp_path / "m.ckpt")


@pytest.mark.parametrize("target", ["lora-diffusers", "merged-diffusers"])
@pytest.mark.parametrize("name", ["x.safetensors", "x.ckpt", "x.PT", "x.bin"])
def test_a_folder_target_given_a_file_name_is_refused(run_dir, tmp_path, capsys, target, name):
    """--to lora-diffusers / merged-diffusers --out x.safetensors created a FOLDER named x.safetensors (the reverse,
    a folder name for a one-file target, was refused). One line, before the model loads (there is none at the base
    path), nothing written."""
    last = _fails_with(capsys, f"--to {target} writes a folder; give a folder name, not {name}",
                       tmp_path / "no-model-here", run_dir, target, tmp_path / name)
    assert last.startswith(f"error: --out {tmp_path / name}: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["lora-diffusers", "merged-diffusers"])
def test_mole_export_refuses_a_file_name_for_a_folder_target_too(tmp_path, capsys, target):
    """`python -m moslora_diffusion.mole export` shares the check (formats/export_targets.check_output)."""
    from moslora_diffusion.composition.cli import main as mole_main

    mole = tmp_path / "mole.safetensors"
    mole.write_bytes(b"not read: the output is checked first")
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        mole_main(["export", "--base", str(tmp_path / "no-model-here"), "--mole", str(mole), "--to", target,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"--to {target} writes a folder; give a folder name, not x.safetensors" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mole.safetensors"]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target, inside", [("merged-diffusers", None), ("lora-kohya", "moslora.safetensors")])
def test_an_output_that_would_overwrite_its_input_adapter_is_refused(tiny_sd15_dir, tmp_path, capsys, target,
                                                                     inside):
    """--out naming the adapter's own run folder (a folder export replaces it whole) or the adapter file itself,
    even with --overwrite: refused before the model loads, the run folder unchanged (the user's notes too)."""
    run = tmp_path / "run"
    run.mkdir()
    _adapter(tiny_sd15_dir, run / "moslora.safetensors")
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    out = run / inside if inside else run
    _fails_with(capsys, f"would overwrite the input {run}", tiny_sd15_dir, run, target, out, "--overwrite")
    assert _tree(run) == before


def test_overwrite_replaces_only_an_earlier_merged_export(tiny_sd15_dir, run_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _fails_with(capsys, "not a merged export of ours", tiny_sd15_dir, run_dir, "merged-diffusers", folder,
                "--overwrite")
    assert _tree(folder) == {"notes.txt": b"mine"}
    # an earlier export holding a file of the user's: it went with the folder, replaced whole; refused now
    merged = tmp_path / "merged"
    args = ["--base", str(tiny_sd15_dir), "--adapter", str(run_dir), "--to", "merged-diffusers", "--out", str(merged),
            "--dtype", "fp32"]
    assert main(args) == 0
    (merged / "notes.txt").write_text("mine")
    before = _tree(merged)
    _fails_with(capsys, "is an earlier export holding files it did not write (notes.txt); move them out first",
                tiny_sd15_dir, run_dir, "merged-diffusers", merged, "--overwrite")
    assert _tree(merged) == before
    (merged / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0  # the earlier export alone is replaced


def test_the_same_adapter_twice_and_a_mole_file_as_adapter_are_refused(tiny_sd15_dir, run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--base", str(tiny_sd15_dir), "--adapter", str(run_dir), "--adapter", f"{run_dir}:0.5", "--to",
              "lora-kohya", "--out", str(tmp_path / "x.safetensors")])
    assert "is given twice" in capsys.readouterr().err
    import torch
    from safetensors.torch import save_file

    mole = tmp_path / "mole.safetensors"
    save_file({"gate.unet.x.bias": torch.zeros(2)}, mole, {"mole": "{}"})
    _fails_with(capsys, "is a MoLE file", tiny_sd15_dir, mole, "lora-kohya", tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
