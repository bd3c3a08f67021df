"""--overwrite replaces only what an earlier export wrote: never a user's file named like the output, nor the
embedding `<word>.safetensors` beside a LoRA when a user (or a training run) wrote it, nor the base model. Each
refusal is one line (exit 2) that names the file and what to do, and the user's files stay byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_export_cli import _adapter, _tree
from test_pivotal import WORD, pivotal_adapter

from moslora_diffusion.export import main
from moslora_diffusion.files.safetensors_io import read_metadata
from moslora_diffusion.formats.embedding_files import is_export_embedding

NOT_OURS_EMBEDDING = ("is not an embedding an earlier export wrote, and the trigger word's embedding goes under that "
                      f"name beside the LoRA: move {WORD}.safetensors away first, or give --out in another folder")


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory, tiny_sd15_dir):
    """A pivotal-tuned adapter: its LoRA exports write `sks.safetensors` beside them."""
    return pivotal_adapter(tiny_sd15_dir, tmp_path_factory.mktemp("pivotal") / "run" / "moslora.safetensors")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_sd15_dir):
    return _adapter(tiny_sd15_dir, tmp_path_factory.mktemp("plain") / "plain.safetensors")


def _export(base, adapter, target, out, *extra) -> int:
    return main(["--base", str(base), "--adapter", str(adapter), "--to", target, "--out", str(out), "--dtype", "fp32",
                 *map(str, extra)])


def _refused(capsys, *args) -> str:
    """The one error line of a refused export (exit 2, no traceback), without its `error: `."""
    with pytest.raises(SystemExit) as exit_info:
        _export(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last.removeprefix("error: ")


def _user_embedding(path):
    """Someone else's embedding under the trigger word's name (another tool's: no metadata of ours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.ones(1, 32)}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_users_embedding_beside_a_kohya_lora_is_never_replaced(tiny_sd15_dir, pivotal, tmp_path, capsys, overwrite):
    """`--to lora-kohya --out ud4/star.safetensors --overwrite` wrote star.safetensors and replaced the user's
    ud4/sks.safetensors with our embedding. Refused before anything is written, with or without --overwrite."""
    folder = tmp_path / "ud4"
    before = _user_embedding(folder / f"{WORD}.safetensors")
    message = _refused(capsys, tiny_sd15_dir, pivotal, "lora-kohya", folder / "star.safetensors", *overwrite)
    assert message == f"{folder / WORD}.safetensors {NOT_OURS_EMBEDDING}"
    assert _tree(folder) == {f"{WORD}.safetensors": before}  # unchanged, and no star.safetensors


def test_lora_diffusers_overwrite_keeps_the_users_own_files(tiny_sd15_dir, pivotal, tmp_path, capsys):
    """`--to lora-diffusers --out userdir --overwrite` replaced the user's pytorch_lora_weights.safetensors and
    sks.safetensors. Each is refused in turn, naming it."""
    folder = tmp_path / "userdir"
    _user_embedding(folder / f"{WORD}.safetensors")
    save_file({"x": torch.ones(2)}, str(folder / "pytorch_lora_weights.safetensors"))
    before = _tree(folder)
    lora = folder / "pytorch_lora_weights.safetensors"
    assert _refused(capsys, tiny_sd15_dir, pivotal, "lora-diffusers", folder, "--overwrite") == (
        f"{lora} is not a file an earlier export wrote (no export record in its metadata); --overwrite replaces only "
        "those: move pytorch_lora_weights.safetensors away first, or choose another --out")
    assert _tree(folder) == before
    lora.unlink()
    del before["pytorch_lora_weights.safetensors"]
    message = _refused(capsys, tiny_sd15_dir, pivotal, "lora-diffusers", folder, "--overwrite")
    assert message == f"{folder / WORD}.safetensors {NOT_OURS_EMBEDDING}"
    assert _tree(folder) == before


@pytest.mark.parametrize("target, out_name", [("lora-kohya", "star.safetensors"), ("lora-diffusers", "lora")])
def test_overwrite_replaces_an_earlier_exports_lora_and_embedding(tiny_sd15_dir, pivotal, tmp_path, capsys, target,
                                                                   out_name):
    """The right value: what an earlier export wrote (the LoRA and its embedding) is replaced with --overwrite, and
    without it the embedding of another export in the same folder still asks for --overwrite."""
    out = tmp_path / out_name
    assert _export(tiny_sd15_dir, pivotal, target, out) == 0
    embedding = (out if target == "lora-diffusers" else tmp_path) / f"{WORD}.safetensors"
    record = json.loads(read_metadata(embedding)["moslora_embedding"])
    assert record["written_by"] == "export" and is_export_embedding(embedding)
    assert _export(tiny_sd15_dir, pivotal, target, out, "--overwrite") == 0
    if target == "lora-kohya":  # a second LoRA beside the first: the shared embedding is an export's, replaceable
        other = tmp_path / "other.safetensors"
        assert _refused(capsys, tiny_sd15_dir, pivotal, target, other) == (
            f"{embedding} (the trigger word's embedding) already exists; pass --overwrite to replace it")
        assert not other.exists()
        assert _export(tiny_sd15_dir, pivotal, target, other, "--overwrite") == 0


def test_which_embeddings_count_as_an_earlier_exports(tmp_path):
    """Only an export's: its record says so, or (written before the record existed) the exact metadata exports wrote
    then, outside a training run's folder. A training run's own, another tool's, a damaged file: not."""
    def embedding(folder, metadata=None):
        path = tmp_path / folder / f"{WORD}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file({"emb_params": torch.ones(1, 32)}, str(path), metadata)
        return path

    def marked(written_by):
        return {"token_abstraction": WORD, "format": "pt", "moslora_embedding": json.dumps({"written_by": written_by})}

    assert is_export_embedding(embedding("export", marked("export")))
    assert is_export_embedding(embedding("legacy", {"token_abstraction": WORD, "format": "pt"}))
    run = embedding("run", {"token_abstraction": WORD, "format": "pt"})
    (run.parent / "moslora.safetensors").write_bytes(b"a training run's adapter")
    assert not is_export_embedding(run)
    assert not is_export_embedding(embedding("training", marked("training run")))
    assert not is_export_embedding(embedding("other-word", {"token_abstraction": "dog", "format": "pt"}))
    assert not is_export_embedding(embedding("other-tool", {"format": "pt"}))
    assert not is_export_embedding(embedding("no-metadata"))
    damaged = tmp_path / "damaged" / f"{WORD}.safetensors"
    damaged.parent.mkdir()
    damaged.write_bytes(b"\x89PNG not safetensors")
    assert not is_export_embedding(damaged)


def test_a_training_runs_embedding_is_not_replaced(tiny_sd15_dir, pivotal, tmp_path, capsys):
    """`--out run/star.safetensors --overwrite` into a pivotal run's folder would have replaced the run's own
    sks.safetensors (which pairs with its adapter) with another adapter's vectors."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(pivotal, run / "moslora.safetensors")
    save_file({"emb_params": torch.ones(1, 32)}, str(run / f"{WORD}.safetensors"),
              {"token_abstraction": WORD, "format": "pt"})  # as runs wrote it before the record
    before = _tree(run)
    message = _refused(capsys, tiny_sd15_dir, pivotal, "lora-kohya", run / "star.safetensors", "--overwrite")
    assert message == f"{run / WORD}.safetensors {NOT_OURS_EMBEDDING}"
    assert _tree(run) == before


@pytest.mark.parametrize("target", ["lora-kohya", "merged-single-file"])
@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_file_target_replaces_only_an_earlier_export(tiny_sd15_dir, plain, tmp_path, capsys, target, overwrite):
    """--overwrite replaced any file, even a PNG renamed .safetensors, while folder targets refused files the export
    did not write. Now a picture, another tool's safetensors and a training run's own LoRA file are all refused."""
    picture = tmp_path / "pic.safetensors"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n a picture")
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(other), {"ss_network_dim": "2"})
    run_lora = tmp_path / "lora_kohya.safetensors"  # a training run's export: its record names no --to target
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(run_lora),
              {"moslora_export": json.dumps({"title": "run", "instance_prompt": "a photo of sks dog"})})
    before = _tree(tmp_path)
    for path in (picture, other, run_lora):
        assert _refused(capsys, tiny_sd15_dir, plain, target, path, *overwrite) == (
            f"{path} is not a file an earlier export wrote (no export record in its metadata); --overwrite replaces "
            f"only those: move {path.name} away first, or choose another --out")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("first, then", [("lora-kohya", "lora-kohya"), ("merged-single-file", "lora-kohya"),
                                         ("lora-kohya", "merged-single-file")])
def test_an_earlier_export_is_replaced_with_overwrite(tiny_sd15_dir, plain, tmp_path, first, then):
    out = tmp_path / "x.safetensors"
    assert _export(tiny_sd15_dir, plain, first, out) == 0
    assert _export(tiny_sd15_dir, plain, then, out, "--overwrite") == 0
    assert json.loads(read_metadata(out).get("moslora_export") or read_metadata(out)["moslora_merge"])["target"] == then


@pytest.fixture(scope="module")
def merged_bases(tmp_path_factory, tiny_sd15_dir, plain):
    """Earlier merged exports of ours, used as base models: --overwrite alone would have replaced them."""
    root = tmp_path_factory.mktemp("bases")
    assert _export(tiny_sd15_dir, plain, "merged-single-file", root / "fx" / "civ.safetensors") == 0
    assert _export(tiny_sd15_dir, plain, "merged-diffusers", root / "merged") == 0
    return root


@pytest.mark.parametrize("case", ["single file", "its folder", "diffusers folder", "inside the folder", "config"])
def test_out_may_not_overwrite_the_base_model(tiny_sd15_dir, plain, merged_bases, tmp_path, capsys, case):
    """`--base fx/civ.safetensors --to merged-single-file --out fx/civ.safetensors --overwrite` replaced the base;
    `--to merged-diffusers --out <the base folder>` likewise. Refused as an adapter input is, before loading."""
    single, folder = merged_bases / "fx" / "civ.safetensors", merged_bases / "merged"
    base, config, target, out = {
        "single file": (single, tiny_sd15_dir, "merged-single-file", single),
        "its folder": (single, tiny_sd15_dir, "merged-diffusers", single.parent),
        "diffusers folder": (folder, None, "merged-diffusers", folder),
        "inside the folder": (folder, None, "merged-diffusers", folder / "unet"),
        "config": (single, folder, "merged-diffusers", folder),
    }[case]
    before = _tree(merged_bases)
    extra = ["--overwrite", *(["--config", config] if config else [])]
    message = _refused(capsys, base, plain, target, out, *extra)
    model = config if case == "config" else base
    verb = "would write into" if case == "inside the folder" else "would overwrite"
    assert message == f"--out {out} {verb} the input {model}; write the output somewhere else"
    assert _tree(merged_bases) == before


@pytest.mark.parametrize("case", ["a picture named .safetensors", "the base model"])
def test_mole_export_shares_the_checks(tmp_path, capsys, case):
    """`python -m moslora_diffusion.mole export --overwrite` goes through the same check_output, and its --out may not
    be a local --base file (it was not compared with it; export's own check was)."""
    from moslora_diffusion.composition.cli import main as mole_main

    mole = tmp_path / "mole.safetensors"
    mole.write_bytes(b"not read: the output is checked first")
    given = tmp_path / ("pic.safetensors" if case.startswith("a picture") else "base.safetensors")
    given.write_bytes(b"\x89PNG\r\n\x1a\n a picture" if case.startswith("a picture") else b"the user's base model")
    base = given if case == "the base model" else tmp_path / "no-model-here"
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        mole_main(["export", "--base", str(base), "--mole", str(mole), "--to", "merged-single-file", "--out",
                   str(given), "--overwrite"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    expected = (f"error: {given} is not a file an earlier export wrote (no export record in its metadata); "
                "--overwrite replaces only those: move pic.safetensors away first, or choose another --out\n"
                if case.startswith("a picture") else
                f"error: --out {given} would overwrite the input {given}; write the output somewhere else\n")
    assert err == expected
    assert _tree(tmp_path) == before
