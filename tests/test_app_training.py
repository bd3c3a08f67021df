"""Training jobs from the app: command line, progress parsing, cancel of the whole group, adapter pickup.

A stand-in trainer (same flags, same tqdm output, same output files) keeps most tests to a second; one
test runs the real train_dreambooth.py for 2 steps on the tiny model.
"""

import os
import signal
import sys
import textwrap
import time

import pytest
from conftest import make_adapter
from PIL import Image

from moslora_diffusion.app.charts import loss_curve_image, scores_chart_image, smooth
from moslora_diffusion.app.paths import AllowedRoots
from moslora_diffusion.app.state import AppState, load_base_pipeline
from moslora_diffusion.app.training_jobs import (
    TRAINER,
    TrainingError,
    TrainingManager,
    TrainingSettings,
    build_command,
    parse_log,
    read_progress_file,
)
from moslora_diffusion.app.uploads import UploadError
from moslora_diffusion.training.settings.config import parse_args

FAKE_TRAINER = textwrap.dedent("""
    import argparse, json, os, shutil, subprocess, sys, time
    from PIL import Image
    p = argparse.ArgumentParser()
    for flag in ("--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--output_dir",
                 "--max_train_steps", "--rank", "--learning_rate", "--validation_prompt", "--validation_steps",
                 "--num_validation_images", "--resolution", "--class_prompt", "--class_data_dir", "--logging_steps",
                 "--validation_metrics", "--validation_loss_photos", "--prior_source", "--token_abstraction"):
        p.add_argument(flag)
    for flag in ("--with_prior_preservation", "--train_text_encoder_ti", "--masked_loss"):
        p.add_argument(flag, action="store_true")
    args = p.parse_args()
    if os.environ.get("FAKE_HANG"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open(os.environ["FAKE_HANG"], "w").write(str(child.pid))
        time.sleep(300)
    out, total = args.output_dir, int(args.max_train_steps)
    os.makedirs(os.path.join(out, "validation"))
    for step in range(1, total + 1):
        sys.stderr.write(f"\\rtraining:  {100 * step // total}%|##   | {step}/{total} [00:01<00:00, 2.0step/s, "
                         f"loss={1.0 / step:.4f}]")
        sys.stderr.flush()
    Image.new("RGB", (8, 8)).save(os.path.join(out, "validation", f"step-{total:06d}-0.png"))
    if args.validation_metrics:  # the real trainer's progress.jsonl records: losses, then a scored validation
        with open(os.path.join(out, "progress.jsonl"), "w") as f:
            for step in range(1, total + 1):
                f.write(json.dumps({"step": step, "total": total, "loss": 1.0 / step}) + "\\n")
            f.write(json.dumps({"step": total, "scores": {"toy_subject": 0.5, "toy_prompt": 0.25},
                                "validation_images": [f"validation/step-{total:06d}-0.png"]}) + "\\n")
            if args.validation_loss_photos:
                f.write(json.dumps({"step": total, "val_loss": 0.125}) + "\\n")
    shutil.copy(os.environ["FAKE_ADAPTER"], os.path.join(out, "moslora.safetensors"))
    sys.exit(int(os.environ.get("FAKE_RC", "0")))
""")


@pytest.fixture(scope="module")
def state(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    photos = root / "photos" / "dog"
    photos.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(photos / f"{i}.png")
    photo_roots = AllowedRoots()
    photo_roots.add(root / "photos")
    app = AppState(load_base_pipeline(tiny_sd15_dir, device="cpu"), tiny_sd15_dir, root / "outputs",
                   photo_roots=photo_roots)
    trainer = root / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    app.training = TrainingManager(app.outputs / "training", trainer, on_finished=app.load_finished_run)
    os.environ["FAKE_ADAPTER"] = str(make_adapter(tiny_sd15_dir, root / "trained.safetensors", seed=4))
    return app


def _wait(job, timeout=60):
    deadline = time.time() + timeout
    while job.running and time.time() < deadline:
        time.sleep(0.1)
    assert not job.running, "trainer did not finish in time"


def test_command_uses_the_trainers_flags(tmp_path):
    settings = TrainingSettings(tmp_path / "photos", " a photo of sks dog ", "a photo of a dog", 50, 8, 512, 25)
    cmd = build_command("org/model", settings, tmp_path / "runs" / "r1", config="cfg")
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert cmd[1] == str(TRAINER) and flags["--pretrained_model_name_or_path"] == "org/model"
    assert flags["--instance_prompt"] == "a photo of sks dog" and flags["--max_train_steps"] == "50"
    assert flags["--logging_steps"] == "1"  # every step's loss for the curve at this length
    assert "--with_prior_preservation" in cmd and cmd[cmd.index("--class_prompt") + 1] == "a photo of a dog"
    assert cmd[cmd.index("--validation_steps") + 1] == "25" and cmd[cmd.index("--single_file_config") + 1] == "cfg"


def test_the_validation_settings_reach_the_trainers_config(tmp_path):
    """The app's command line, parsed by the trainer itself: the prompt and metric the Train tab sent are the
    TrainConfig's (an empty validation prompt means the instance prompt; "none" adds no flag)."""
    settings = TrainingSettings(tmp_path / "photos", "a photo of sks star", "", 40, 4, 64, 10,
                                validation_prompt=" a sks star on the beach ", validation_metrics="toy",
                                validation_loss_photos=2)
    settings.check()
    config = parse_args(build_command("assets/toy-base", settings, tmp_path / "run")[2:])
    assert (config.validation_prompt, config.validation_metrics, config.validation_steps,
            config.validation_loss_photos) == ("a sks star on the beach", "toy", 10, 2)
    plain = TrainingSettings(tmp_path / "photos", "a photo of sks star", steps=40, validation_steps=10)
    config = parse_args(build_command("assets/toy-base", plain, tmp_path / "run")[2:])
    assert (config.validation_prompt, config.validation_metrics, config.validation_loss_photos) == (
        "a photo of sks star", "none", 0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"validation_metrics": "fid"}, "validation scores must be one of"),
    ({"validation_metrics": "toy", "validation_steps": 0}, "set 'validation every N steps' above 0"),
    ({"validation_metrics": "toy", "resolution": 128}, "the toy scorer reads the toy world's 64x64 images, got "
                                                      "resolution 128: use resolution 64"),
    ({"validation_loss_photos": -1}, "held-out photos must be between 0 and 100"),
    ({"validation_loss_photos": 2, "validation_steps": 0}, "held-out loss is scored at every validation"),
])
def test_bad_validation_settings_are_refused(tmp_path, overrides, message):
    settings = TrainingSettings(tmp_path, "a photo of sks dog", **overrides)
    with pytest.raises(TrainingError, match=message):
        settings.check()


def test_tqdm_output_is_parsed():
    log = ("Loading weights: 100%|##| 36/36 [00:00<00:00, 1.0it/s]\n"
           "generating class images:  50%|#  | 5/10 [00:01<00:01]\r"
           "training:   0%|     | 0/4 [00:00<?, ?step/s]\rtraining:  25%|#  | 1/4 [00:01<00:03, 1.0step/s, "
           "loss=0.5000]\rtraining:  50%|## | 2/4 [00:02<00:02, 1.0step/s, loss=2.5e-01]\r")
    step, total, losses, last = parse_log(log)
    assert (step, total, losses) == (2, 4, [(1, 0.5), (2, 0.25)]) and last.startswith("training:  50%")
    assert parse_log("")[:3] == (0, 0, [])


def test_loss_curve_is_an_image():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    for points in ([], [(1, 0.5)], [(i, 1 / i) for i in range(1, 50)] + [(50, float("nan"))]):
        image = loss_curve_image(points)
        assert image.size == (520, 220)


def test_scores_chart_draws_each_metric_and_a_placeholder_without_scores():
    placeholder = scores_chart_image([])
    assert placeholder.size == (520, 220)
    assert scores_chart_image([(5, {})]).tobytes() == placeholder.tobytes()  # a record with no metric
    low = scores_chart_image([(10, {"dino": 0.2, "clip_t": 0.25}), (20, {"dino": 0.4, "clip_t": 0.26})])
    high = scores_chart_image([(10, {"dino": 0.2, "clip_t": 0.25}), (20, {"dino": 0.6, "clip_t": 0.26})])
    assert low.size == (520, 220) and low.tobytes() != placeholder.tobytes()
    assert low.tobytes() != high.tobytes()  # another score, another picture
    assert scores_chart_image([(10, {"dino": 0.3})]).tobytes() != placeholder.tobytes()  # a single validation


def test_held_out_loss_is_drawn_on_the_loss_curve():
    losses = [(i, 1 / i) for i in range(1, 30)]
    plain = loss_curve_image(losses)
    with_held_out = loss_curve_image(losses, [(10, 0.3), (20, 0.2)])
    assert with_held_out.tobytes() != plain.tobytes()
    assert with_held_out.tobytes() != loss_curve_image(losses, [(10, 0.3), (20, 0.25)]).tobytes()
    assert loss_curve_image([], [(10, 0.3)]).tobytes() != loss_curve_image([]).tobytes()  # held-out loss alone


def test_progress_file_gives_losses_scores_and_held_out_loss(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"step": 1, "total": 4, "loss": 0.5}\n{"step": 2, "total": 4, "loss": 0.25}\n'
                    '{"step": 2, "scores": {"dino": 0.5}, "val_loss": 0.125, "validation_images": ["v/a.png"]}\n'
                    '{"step": 3, "total": 4, "lo')  # a line being written
    read = read_progress_file(path)
    assert (read.step, read.total, read.losses) == (2, 4, [(1, 0.5), (2, 0.25)])
    assert read.scores == [(2, {"dino": 0.5})] and read.held_out == [(2, 0.125)]
    assert read.validation_images == [tmp_path / "v" / "a.png"]


def test_training_from_a_given_folder_finishes_and_loads_the_adapter(state):
    job = state.start_training("a photo of sks dog", steps=5, rank=4, resolution=64, folder="photos/dog")
    _wait(job)
    progress = job.progress()
    assert progress.state == "finished" and (progress.step, progress.total) == (5, 5), progress.message
    assert progress.losses[-1] == (5, 0.2) and len(progress.validation_images) == 1
    name = state.register_finished_training()
    assert name == job.output_dir.name and name in state.fusion.names() and state.fusion.scales[name] == 1.0
    loaded = state.fusion.names()
    assert state.register_finished_training() == name and state.fusion.names() == loaded  # loaded once only
    assert name in state.available_adapters()  # the app's own training folder is an allowed root


def test_a_run_that_finishes_with_no_page_open_is_loaded_all_the_same(state):
    """Nobody polls (no page open, no register call): the app itself loads the adapter when the trainer exits,
    so a page opened later shows it (its slider and the header name it)."""
    job = state.start_training("a photo of sks dog", steps=2, rank=4, resolution=64, folder="photos/dog")
    before = state.fusion.names()
    deadline = time.time() + 60
    while job.registered_as is None and time.time() < deadline:  # set once the load has finished
        time.sleep(0.1)
    assert job.progress().state == "finished"
    assert state.fusion.names() == before + [job.output_dir.name] and job.registered_as == job.output_dir.name
    assert job.output_dir.name in state.status_text()


def test_a_scored_run_reports_its_scores_to_the_train_tab(state):
    job = state.start_training("a photo of sks dog", steps=3, rank=4, resolution=64, folder="photos/dog",
                               validation_steps=3, validation_prompt="a sks dog", validation_metrics="toy",
                               validation_loss_photos=1)
    assert job.cmd[job.cmd.index("--validation_metrics") + 1] == "toy"
    _wait(job)
    progress = job.progress()
    assert progress.state == "finished" and progress.losses == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert progress.scores == [(3, {"toy_subject": 0.5, "toy_prompt": 0.25})] and progress.held_out == [(3, 0.125)]
    assert scores_chart_image(progress.scores).tobytes() != scores_chart_image([]).tobytes()
    state.register_finished_training()


def test_uploaded_photos_are_checked_then_staged(state, tmp_path):
    (tmp_path / "evil.png").write_text("#!/bin/sh\nrm -rf /")
    with pytest.raises(UploadError, match="evil.png: not an image Pillow can read"):
        state.start_training("a photo of sks cat", steps=2, uploads=[str(tmp_path / "evil.png")])
    Image.new("RGB", (64, 64)).save(tmp_path / "cat.jpg")
    job = state.start_training("a photo of sks cat", steps=2, uploads=[str(tmp_path / "cat.jpg")])
    _wait(job)
    photos_dir = job.cmd[job.cmd.index("--instance_data_dir") + 1]
    assert os.path.basename(os.path.dirname(photos_dir)) == "uploads" and os.listdir(photos_dir) == ["photo_000.jpg"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(instance_prompt=" ", folder="photos/dog"), "instance prompt"),
    (dict(instance_prompt="sks", steps=0, folder="photos/dog"), "steps must be between"),
    (dict(instance_prompt="sks", rank=100000, folder="photos/dog"), "rank must be between"),
    (dict(instance_prompt="sks", folder="../../etc"), "unknown photo folder"),
    (dict(instance_prompt="sks"), "choose a photo folder or upload"),
])
def test_bad_training_settings_are_refused(state, kwargs, message):
    with pytest.raises((TrainingError, UploadError), match=message):
        state.start_training(**kwargs)


def test_failed_run_is_reported(state, monkeypatch):
    monkeypatch.setenv("FAKE_RC", "3")
    job = state.start_training("a photo of sks dog", steps=1, folder="photos/dog")
    _wait(job)
    progress = job.progress()
    assert progress.state == "failed" and "exited with code 3" in progress.message
    assert state.register_finished_training() is None


def test_cancel_stops_the_trainer_and_its_children(state, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_HANG", str(tmp_path / "child.pid"))
    job = state.start_training("a photo of sks dog", steps=1, folder="photos/dog")
    with pytest.raises(TrainingError, match="already in progress"):
        state.start_training("a photo of sks dog", steps=1, folder="photos/dog")
    deadline = time.time() + 30
    while not (tmp_path / "child.pid").exists() and time.time() < deadline:
        time.sleep(0.1)
    child = int((tmp_path / "child.pid").read_text())
    state.training.cancel()
    assert not job.running and job.progress().state == "cancelled"
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the trainer's child process survived the cancel"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not TRAINER.is_file(), reason="train_dreambooth.py not in this checkout")
def test_real_trainer_runs_from_the_app(state, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores: one thread is faster for a tiny model
    real = TrainingManager(state.outputs / "training", TRAINER, on_finished=state.load_finished_run)
    state.training, fake = real, state.training
    try:
        job = state.start_training("a photo of sks dog", steps=2, rank=2, resolution=64, validation_steps=0,
                                   folder="photos/dog")
        _wait(job, timeout=240)
        progress = job.progress()
        assert progress.state == "finished", progress.message
        assert (progress.step, progress.total) == (2, 2) and progress.losses
        name = state.register_finished_training()
        assert name in state.fusion.names()
    finally:
        state.training = fake
    assert signal.SIGTERM  # (imported for the cancel test's reader: the group gets SIGTERM first)
    assert sys.executable in job.cmd
