"""The run folder: a run is recognised however its paths are spelled or wherever it was moved;
--overwrite_output_dir deletes exactly what a run recorded writing; a checkpoint resumed into a new folder
either applies a changed setting or refuses it; an unwritable folder or a full disk stops the run before
the model loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from training_helpers import (
    REPO,
    adapter_weights,
    cli_args,
    cli_env,
    make_photos,
    run_training,
    snapshot,
    tiny_config,
)

from moslora_diffusion.training import CheckpointError, OutputDirError
from moslora_diffusion.training.run_folder.checkpoints import read_checkpoint, save_checkpoint
from moslora_diffusion.training.run_folder.manifest import MANIFEST_FILE, read_manifest
from moslora_diffusion.training.run_folder.outputs import prepare_output_dir
from moslora_diffusion.training.run_folder.resume import check_resume_settings

MIB = 2**20


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the trainer gets as far as loading the base model."""
    def load_base(*args, **kwargs):
        raise AssertionError("the base model was loaded before the bad input was reported")

    # Not the no_model_load fixture: checkpoint_a must load the model to train first.
    monkeypatch.setattr("moslora_diffusion.training.trainer.loop.load_base", load_base)


def _error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message  # one line
    return message


# --- kind 1: run identity --------------------------------------------------------------------------------


def test_a_run_resumes_under_any_spelling_of_its_paths_and_after_a_move(tiny_sd15_dir, tmp_path, monkeypatch):
    """Started as `--output_dir runs/dog --instance_data_dir photos --class_data_dir class`; resumed as
    `runs/dog/`, as absolute paths, and after `mv runs/dog runs/dog2` and `mv photos photos-moved`."""
    monkeypatch.chdir(tmp_path)
    make_photos(tmp_path / "photos")
    prior = dict(with_prior_preservation=True, class_prompt="a photo of a dog", num_class_images=2)

    def run(out: str, photos: str, classes: str, steps: int, **resume):
        return run_training(tiny_config(tiny_sd15_dir, photos, out, class_data_dir=classes, max_train_steps=steps,
                                        checkpointing_steps=1, **prior, **resume))

    assert run("runs/dog", "photos", "class", 1).steps == 1
    resumed = run("runs/dog/", "photos/", "class/", 2, resume_from_checkpoint="latest")
    assert (resumed.resumed_from, resumed.steps) == (1, 2)
    resumed = run(str(tmp_path / "runs" / "dog"), str(tmp_path / "photos"), str(tmp_path / "class"), 3,
                  resume_from_checkpoint="latest")
    assert (resumed.resumed_from, resumed.steps) == (2, 3)

    (tmp_path / "runs" / "dog").rename(tmp_path / "runs" / "dog2")
    (tmp_path / "photos").rename(tmp_path / "photos-moved")  # same files: the same photos
    (tmp_path / "class").rename(tmp_path / "class-moved")
    resumed = run("runs/dog2", "photos-moved", "class-moved", 4, resume_from_checkpoint="latest")
    assert (resumed.resumed_from, resumed.steps) == (3, 4)
    recorded = json.loads((tmp_path / "runs" / "dog2" / "training_config.json").read_text())
    assert recorded["inputs"]["instance_data_dir"]["path"] == str(tmp_path / "photos-moved")


def test_a_resumable_run_with_other_settings_names_the_flags_that_resume_it(tiny_sd15_dir, tmp_path,
                                                                            no_model_load):
    """The advice is never --overwrite_output_dir, which would delete the checkpoints the user wants."""
    photos = make_photos(tmp_path / "photos")
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)  # a complete checkpoint, as far as the folder check reads it
    (out / "checkpoint-1" / "state.json").write_text(json.dumps({"step": 1, "files": []}))
    (out / MANIFEST_FILE).write_text(json.dumps({"written": ["checkpoint-1", "training_config.json"]}))
    stored = tiny_config(tiny_sd15_dir, photos, out, checkpointing_steps=1)
    (out / "training_config.json").write_text(json.dumps({"moslora_diffusion_version": "0", "plan": {},
                                                          "config": stored.to_dict()}))
    before = snapshot(out)

    with pytest.raises(OutputDirError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, out, checkpointing_steps=1, rank=8, center_crop=True))
    message = _error(excinfo)
    assert "holds a resumable run (up to checkpoint-1) with other settings (center_crop: False -> True, " \
           "rank: 4 -> 8)" in message
    assert "pass --no-center_crop --rank 4 --resume_from_checkpoint latest" in message
    assert "choose another --output_dir" in message and "--overwrite_output_dir would delete its checkpoints" in message
    assert "pass --overwrite_output_dir" not in message

    # Another photo folder holding other photos is another run, whatever the name.
    other = make_photos(tmp_path / "other", seed=7)
    with pytest.raises(OutputDirError, match=re.escape(f"instance_data_dir: '{photos}' -> '{other}'")):
        run_training(tiny_config(tiny_sd15_dir, other, out, checkpointing_steps=1))
    # A setting one of the two runs leaves unset reads "(not set)", not Python's None.
    with pytest.raises(OutputDirError, match=re.escape("lora_alpha: (not set) -> 8.0")):
        run_training(tiny_config(tiny_sd15_dir, photos, out, checkpointing_steps=1, lora_alpha=8.0))
    assert snapshot(out) == before


def test_the_same_run_again_without_resume_is_refused_before_it_replaces_the_runs_work(tiny_sd15_dir, tmp_path):
    """The same command again (or with more steps) into a run's folder started over from step 0 without a word: it
    replaced a finished run's adapter, and rewrote an interrupted run's checkpoints. It is refused now, before the
    model loads, naming what continues the run; --resume_from_checkpoint latest and --overwrite_output_dir work."""
    photos = make_photos(tmp_path / "photos")
    finished = tmp_path / "finished"
    run_training(tiny_config(tiny_sd15_dir, photos, finished, max_train_steps=2))
    before = snapshot(finished)
    with pytest.raises(OutputDirError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, finished, max_train_steps=1))
    assert _error(excinfo) == (f"--output_dir {finished} holds this run, finished at step 2 and keeping no checkpoint "
                               "to continue from: training again would replace what it wrote; choose another "
                               "--output_dir, or pass --overwrite_output_dir to train it again from step 0")
    assert snapshot(finished) == before
    with pytest.raises(OutputDirError, match="keeping no checkpoint"):  # `latest` found none and started at 0
        run_training(tiny_config(tiny_sd15_dir, photos, finished, max_train_steps=4, resume_from_checkpoint="latest"))
    assert snapshot(finished) == before
    again = run_training(tiny_config(tiny_sd15_dir, photos, finished, max_train_steps=1, overwrite_output_dir=True))
    assert again.steps == 1 and snapshot(finished) != before

    stopped = tmp_path / "stopped"
    run_training(tiny_config(tiny_sd15_dir, photos, stopped, max_train_steps=2, checkpointing_steps=1))
    before = snapshot(stopped)
    with pytest.raises(OutputDirError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, stopped, max_train_steps=3, checkpointing_steps=1))
    assert "holds this run up to checkpoint-2: add --resume_from_checkpoint latest to continue it" in _error(excinfo)
    assert snapshot(stopped) == before
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, stopped, max_train_steps=3, checkpointing_steps=1,
                                       resume_from_checkpoint="latest"))
    assert (resumed.resumed_from, resumed.steps) == (2, 3)


# --- kind 2: --overwrite_output_dir and the manifest ---------------------------------------------------------


def _user_folder(folder: Path) -> Path:
    """A folder that never held a run, with the user's files under names a run writes."""
    (folder / "logs").mkdir(parents=True)
    (folder / "validation").mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "progress.jsonl").write_text("my progress\n")
    (folder / "logs" / "day1.txt").write_text("log")
    (folder / "validation" / "best.png").write_bytes(b"png")
    return folder


def test_overwrite_never_deletes_files_that_no_run_wrote(tiny_sd15_dir, tmp_path, no_model_load):
    photos = make_photos(tmp_path / "photos")
    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(OutputDirError) as excinfo:
            run_training(tiny_config(tiny_sd15_dir, photos, folder, overwrite_output_dir=overwrite))
        message = _error(excinfo)
        assert "holds README.md, logs, progress.jsonl, validation, which no run of ours wrote" in message
        assert "choose another --output_dir" in message
    assert snapshot(folder) == before


def test_overwrite_refusal_on_the_command_line_is_one_line(tiny_sd15_dir, tmp_path):
    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    config = tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos"), folder, overwrite_output_dir=True)
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"), *cli_args(config)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --output_dir") and proc.stderr.count("\n") == 1, proc.stderr
    assert snapshot(folder) == before


def test_overwrite_deletes_exactly_what_the_manifest_lists(tiny_sd15_dir, tmp_path):
    photos = make_photos(tmp_path / "photos")
    out = tmp_path / "out"
    run_training(tiny_config(tiny_sd15_dir, photos, out, max_train_steps=2, checkpointing_steps=1,
                             validation_prompt="a photo of sks dog", validation_steps=1, num_validation_images=1))
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert entries == {"checkpoint-1", "checkpoint-2", "validation", "progress.jsonl", "training_config.json",
                       "moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                       "README.md"}
    assert read_manifest(out) == entries  # every entry the run wrote is listed, nothing else

    (out / "notes.txt").write_text("mine")  # a user's own file in the run folder: kept, and no obstacle
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, out, max_train_steps=3, checkpointing_steps=1,
                                       resume_from_checkpoint="latest"))
    assert (resumed.resumed_from, resumed.steps) == (2, 3)

    run_training(tiny_config(tiny_sd15_dir, photos, out, rank=8, max_train_steps=1, overwrite_output_dir=True))
    left = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert left == {"notes.txt", "progress.jsonl", "training_config.json", "moslora.safetensors",
                    "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"}
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "training_config.json").read_text())["config"]["rank"] == 8
    assert len((out / "progress.jsonl").read_text().splitlines()) == 1  # the new run's step, not the old ones
    assert read_manifest(out) == left - {"notes.txt"}


def test_overwrite_keeps_a_file_the_user_saved_among_the_validation_images(tiny_sd15_dir, tmp_path):
    """A picture the user saved in validation/ was deleted with the folder by --overwrite_output_dir."""
    photos = make_photos(tmp_path / "photos")
    out = tmp_path / "out"
    validate = dict(validation_prompt="a photo of sks dog", validation_steps=1, num_validation_images=1)
    run_training(tiny_config(tiny_sd15_dir, photos, out, **validate))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001-0.png", "step-000002-0.png"]
    keep = out / "validation" / "keep-this.png"
    shutil.copyfile(out / "validation" / "step-000001-0.png", keep)
    kept = keep.read_bytes()

    run_training(tiny_config(tiny_sd15_dir, photos, out, rank=8, overwrite_output_dir=True))  # no validation
    assert [p.name for p in (out / "validation").iterdir()] == ["keep-this.png"] and keep.read_bytes() == kept
    assert "validation" in read_manifest(out)  # still the runs' folder: the next run may write there

    run_training(tiny_config(tiny_sd15_dir, photos, out, overwrite_output_dir=True, **validate))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["keep-this.png", "step-000001-0.png",
                                                                    "step-000002-0.png"]
    assert keep.read_bytes() == kept


def test_overwrite_deletes_only_validation_images_by_the_names_a_run_gives_them(tiny_sd15_dir, tmp_path):
    """The run's step-NNNNNN-i.png and a killed write's temporary of one go; the user's files stay, and a folder
    left empty goes with the images."""
    out = tmp_path / "out"
    validation = out / "validation"
    (validation / "picks").mkdir(parents=True)
    for name in ("step-000001-0.png", "step-12345678-3.png", ".step-000002-0.png.4242-abcdefgh.tmp"):
        (validation / name).write_bytes(b"a run's image")
    for name in ("keep-this.png", "step-1-0.png", "step-000001-0.png.bak", "picks/step-000001-0.png"):
        (validation / name).write_bytes(b"the user's")
    (out / MANIFEST_FILE).write_text(json.dumps({"format_version": 1, "written": ["validation"]}))
    config = tiny_config(tiny_sd15_dir, tmp_path, out, rank=8, overwrite_output_dir=True)
    prepare_output_dir(config, {})
    assert sorted(str(p.relative_to(validation)) for p in validation.rglob("*")) == [
        "keep-this.png", "picks", "picks/step-000001-0.png", "step-000001-0.png.bak", "step-1-0.png"]
    assert read_manifest(out) == {"validation", "training_config.json"}

    shutil.rmtree(validation)  # this time only a run's image is in there
    validation.mkdir()
    (validation / "step-000003-0.png").write_bytes(b"a run's image")
    prepare_output_dir(config, {})
    assert not validation.exists() and read_manifest(out) == {"training_config.json"}


def test_the_logging_folder_is_recorded_when_trackers_write_it(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, tmp_path / "out", report_to="tensorboard", logging_dir="tb/run")
    prepare_output_dir(config, {})
    assert read_manifest(tmp_path / "out") == {"tb", "training_config.json"}


def test_a_run_written_before_manifests_resumes_and_overwrite_deletes_only_its_known_files(tiny_sd15_dir, tmp_path):
    """A folder from the previous version: training_config.json of ours (without "inputs") and no manifest.
    Its files under the names a run writes count as the run's; anything else is kept."""
    photos = make_photos(tmp_path / "photos")
    for folder in ("out", "out2"):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / folder, max_train_steps=1, checkpointing_steps=1))
        (tmp_path / folder / MANIFEST_FILE).unlink()
        record = json.loads((tmp_path / folder / "training_config.json").read_text())
        del record["inputs"]
        (tmp_path / folder / "training_config.json").write_text(json.dumps(record))
        (tmp_path / folder / "notes.txt").write_text("mine")

    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=2,
                                       checkpointing_steps=1, resume_from_checkpoint="latest"))
    assert (resumed.resumed_from, resumed.steps) == (1, 2)
    assert "checkpoint-1" in read_manifest(tmp_path / "out") and "notes.txt" not in read_manifest(tmp_path / "out")

    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out2", max_train_steps=1, rank=8,
                             overwrite_output_dir=True))
    assert not (tmp_path / "out2" / "checkpoint-1").exists() and (tmp_path / "out2" / "notes.txt").exists()


# --- kind 4: resuming from a checkpoint into a new folder ---------------------------------------------------


@pytest.fixture
def checkpoint_a(tiny_sd15_dir, tmp_path):
    """a/checkpoint-2 of a run with learning rate 1e-3 and gradient accumulation 2."""
    photos = make_photos(tmp_path / "photos", count=3)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "a", max_train_steps=2, checkpointing_steps=2,
                             learning_rate=1e-3, gradient_accumulation_steps=2))
    return photos, tmp_path / "a" / "checkpoint-2"


@pytest.mark.parametrize(("changed", "named"), [
    ({"learning_rate": 2e-3}, "made with --learning_rate 0.001, but this run has --learning_rate 0.002"),
    ({"gradient_accumulation_steps": 1},
     "made with --gradient_accumulation_steps 2, but this run has --gradient_accumulation_steps 1"),
    ({"train_batch_size": 2}, "a global batch of 1 (--train_batch_size x processes), but this run has a global "
                              "batch of 2"),
])
@pytest.mark.parametrize("recorded_in", ["checkpoint", "run_folder"])
def test_resuming_with_a_setting_the_checkpoint_restores_is_refused(tiny_sd15_dir, tmp_path, checkpoint_a,
                                                                     monkeypatch, changed, named, recorded_in):
    photos, checkpoint = checkpoint_a
    if recorded_in == "run_folder":  # a checkpoint of the previous version: its run's training_config.json tells
        state = json.loads((checkpoint / "state.json").read_text())
        del state["settings"]
        (checkpoint / "state.json").write_text(json.dumps(state))
    settings = dict(learning_rate=1e-3, gradient_accumulation_steps=2, max_train_steps=3, resume_from_checkpoint=str(
        checkpoint)) | changed
    # Not the no_model_load fixture: checkpoint_a must load the model to train first.
    monkeypatch.setattr("moslora_diffusion.training.trainer.loop.load_base",
                        lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(CheckpointError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", **settings))
    message = _error(excinfo)
    assert named in message and "pass the checkpoint's values to resume from it" in message
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_whose_settings_are_unknown_is_resumed_with_a_warning(tmp_path):
    """No "settings" in its state.json and no training_config.json beside it: nothing to compare, so say so."""
    info = read_checkpoint(save_checkpoint(tmp_path / "handed-over", 3, {"family": "sd1"}, {}, {}))
    config = tiny_config(Path("m"), tmp_path, tmp_path / "b", learning_rate=5e-3)
    with pytest.warns(UserWarning, match="does not record the settings it was made with"):
        check_resume_settings(info, config, num_processes=1)


def test_settings_a_resume_may_change_apply_and_are_recorded(tiny_sd15_dir, tmp_path, checkpoint_a):
    """More steps and another schedule shape take effect from the first resumed step: step 3 of a linear decay
    over 3 steps runs at a third of the constant rate (the optimizer state carries the checkpoint's constant
    rate, which must not leak into it), so the weights differ; b/training_config.json records what was used."""
    photos, checkpoint = checkpoint_a
    same = dict(learning_rate=1e-3, gradient_accumulation_steps=2, max_train_steps=3,
                resume_from_checkpoint=str(checkpoint))
    linear = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", lr_scheduler="linear", **same))
    constant = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "c", **same))
    assert (linear.resumed_from, linear.steps) == (constant.resumed_from, constant.steps) == (2, 3)
    recorded = json.loads((tmp_path / "b" / "training_config.json").read_text())["config"]
    assert (recorded["lr_scheduler"], recorded["max_train_steps"], recorded["learning_rate"]) == ("linear", 3, 1e-3)
    b, c = adapter_weights(tmp_path / "b"), adapter_weights(tmp_path / "c")
    assert any(c[k].abs().max() > 0 for k in c if k.endswith("moslora_B"))
    assert max((b[k] - c[k]).abs().max().item() for k in b) > 1e-6
    assert all(torch.isfinite(b[k]).all() for k in b)


# --- kind 5: an output folder that cannot take the run ------------------------------------------------------


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(tiny_sd15_dir, tmp_path, monkeypatch,
                                                                          no_model_load):
    photos = make_photos(tmp_path / "photos")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputDirError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "plain" / "run"))
    assert f"cannot be created: {tmp_path / 'plain'} is a file" in _error(excinfo)

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes into a 0o555 folder: let the OS answer as it does for others
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (Path(path) == locked and mode & os.W_OK)
                            and real_access(path, mode, **kw))
    try:
        with pytest.raises(OutputDirError) as excinfo:
            run_training(tiny_config(tiny_sd15_dir, photos, locked / "runs" / "dog"))
        assert f"cannot be written (no write permission on {locked})" in _error(excinfo)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def _free(monkeypatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - free, free))


def test_a_nearly_full_disk_is_refused_before_loading(tiny_sd15_dir, tmp_path, monkeypatch, no_model_load):
    photos = make_photos(tmp_path / "photos")
    _free(monkeypatch, 59 * MIB)
    with pytest.raises(OutputDirError) as excinfo:
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out"))
    assert _error(excinfo) == (f"not enough free disk space in {tmp_path}: 59 MiB free, and a run needs at least 64 "
                               "MiB free to write its files safely; free space or choose another --output_dir")
    assert not (tmp_path / "out").exists()


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_writing(tiny_sd15_dir, tmp_path, monkeypatch):
    """Once the adapter's size is known: 1000 checkpoints of it do not fit in 1 MiB above the margin."""
    photos = make_photos(tmp_path / "photos")
    _free(monkeypatch, 65 * MIB)
    with pytest.raises(OutputDirError, match=r"65 MiB free, and this run needs about \d+ MiB \(the adapter, its "
                                             r"exports and 1000 checkpoints"):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=1000, checkpointing_steps=1))
    assert not (tmp_path / "out").exists()


def test_overwrite_deletes_only_the_trackers_logs_and_keeps_the_users_files_there(tiny_sd15_dir, tmp_path):
    """--overwrite_output_dir deleted the whole logging folder, with a file the user kept there; now only
    tensorboard's event files go (and the folders they leave empty)."""
    out = tmp_path / "out"
    logs = out / "logs"
    for name in ("moslora-dreambooth/events.out.tfevents.1765000000.host.1.0",
                 "moslora-dreambooth/1765000000.5/events.out.tfevents.1765000000.host.1.1"):
        (logs / name).parent.mkdir(parents=True, exist_ok=True)
        (logs / name).write_bytes(b"a run's events")
    (logs / "notes.md").write_text("the user's")
    (out / MANIFEST_FILE).write_text(json.dumps({"format_version": 1, "written": ["logs"]}))
    config = tiny_config(tiny_sd15_dir, tmp_path, out, rank=8, overwrite_output_dir=True, report_to="tensorboard")
    prepare_output_dir(config, {})
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*")) == ["notes.md"]
    assert "logs" in read_manifest(out)

    (logs / "notes.md").unlink()  # only the run's logs this time: the folder goes
    (logs / "moslora-dreambooth").mkdir()
    (logs / "moslora-dreambooth" / "events.out.tfevents.1765000001.host.1.0").write_bytes(b"a run's events")
    prepare_output_dir(config, {})
    assert not logs.exists()
