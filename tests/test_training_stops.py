"""Runs that end early: a loss that turns NaN / inf, Ctrl-C and SIGTERM. The last good state is kept, nothing
non-finite is written, the message is one line, and a run stopped by a signal resumes to the uninterrupted result bit
for bit."""

from __future__ import annotations

import json
import signal
import time
import types
from pathlib import Path

import pytest
import torch
from training_helpers import (
    adapter_weights,
    cli_args,
    make_photos,
    reset_accelerate,
    run_training,
    start_cli,
    tiny_config,
)

import moslora_diffusion.training.run_folder.checkpoints as checkpoints
import moslora_diffusion.training.trainer.loop as loop
from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.training import TrainingDiverged, TrainingInterrupted, main
from moslora_diffusion.training.run_folder.checkpoints import find_resume_checkpoint
from moslora_diffusion.training.run_folder.manifest import MANIFEST_FILE
from moslora_diffusion.training.run_folder.outputs import ADAPTER_FILE, KOHYA_FILE, PROGRESS_FILE

# Gradient accumulation, EMA and a linear schedule: every piece of state a checkpoint must carry exactly.
SETTINGS = dict(max_train_steps=6, checkpointing_steps=2, gradient_accumulation_steps=2, use_ema=True,
                learning_rate=1e-3, lr_scheduler="linear")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("stops") / "photos", count=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd15_dir, photos, tmp_path_factory):
    """The adapter of the same run without any interruption."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_training(tiny_config(tiny_sd15_dir, photos, out, **SETTINGS))
    weights = adapter_weights(out)
    assert any(weights[k].abs().max() > 0 for k in weights if k.endswith("moslora_B"))  # B learned: not trivial
    return weights


@pytest.fixture(autouse=True)
def _default_sigint_handler():
    """These tests send SIGINT to their own process: the trainer must have taken it over, else pytest would stop."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and given it back


def _resume_and_compare(model, photos, out: Path, reference: dict) -> None:
    resumed = run_training(tiny_config(model, photos, out, resume_from_checkpoint="latest", **SETTINGS))
    assert resumed.steps == SETTINGS["max_train_steps"]
    weights = adapter_weights(out)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def _sigint_at(monkeypatch, target, name: str, when, after: bool = False) -> None:
    """Wraps target.name so that the call for which when(*args) is true sends this process SIGINT (before the
    real call, or right after it)."""
    real = getattr(target, name)

    def wrapped(*args, **kwargs):
        fire = when(*args)
        if fire and not after:
            signal.raise_signal(signal.SIGINT)
        result = real(*args, **kwargs)
        if fire and after:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(target, name, wrapped)


# --- a loss that is no longer a number ----------------------------------------------------------------------------


def test_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_writes_no_adapter(tiny_sd15_dir, photos, tmp_path,
                                                                                     monkeypatch):
    """The loss turns NaN at step 3 (of 6; checkpoints every 2 steps, losses read back every 4): the run stops at the
    next check (step 4) naming step 3, before checkpoint-4 is written; checkpoint-2 stays, finite."""
    real, calls = loop.diffusion_loss, []

    def nan_from_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", nan_from_step_3)
    out = tmp_path / "out"
    config = tiny_config(tiny_sd15_dir, photos, out, max_train_steps=6, checkpointing_steps=2, logging_steps=4)
    with pytest.raises(TrainingDiverged) as err:
        run_training(config)
    message = str(err.value)
    assert "\n" not in message
    assert "the loss became nan at step 3" in message and "checkpoint-2, the last good state, is kept" in message
    assert "--learning_rate" in message
    # no moslora.safetensors, no diffusers / kohya export, no checkpoint-4
    # the run folder's manifest lists what the run wrote: the checkpoint, progress and config, no adapter
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "checkpoint-2", PROGRESS_FILE,
                                                    "training_config.json"]
    tensors = load_tensors(out / "checkpoint-2" / "adapter.safetensors")[0]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    steps = [json.loads(line)["step"] for line in (out / PROGRESS_FILE).read_text().splitlines()]
    assert steps == [1, 2]  # the finite losses are recorded, the NaN ones are not


def test_a_diverging_learning_rate_ends_the_command_with_one_line_and_status_1(tiny_sd15_dir, photos, tmp_path,
                                                                               capsys):
    """A real divergence: learning rate 1e30 sends the weights to ~1e30, the loss overflows."""
    out = tmp_path / "out"
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(cli_args(tiny_config(tiny_sd15_dir, photos, out, max_train_steps=8, checkpointing_steps=1,
                                      learning_rate=1e30)))
        status = exit_info.value.code
    finally:
        reset_accelerate()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith("error: training diverged: the loss became ") and "a lower --learning_rate" in lines[0]
    assert not (out / ADAPTER_FILE).exists() and not (out / KOHYA_FILE).exists()
    kept = find_resume_checkpoint("latest", out)
    assert kept is not None and f"{kept.path.name}, the last good state, is kept" in lines[0]
    tensors = load_tensors(kept.path / "adapter.safetensors")[0]
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_weights_that_turn_non_finite_with_a_finite_loss_are_caught(tiny_sd15_dir, photos, tmp_path):
    """An inf gradient can make the update NaN while the step's own loss was finite: weights are checked too."""
    config = tiny_config(tiny_sd15_dir, photos, tmp_path / "out")
    run = types.SimpleNamespace(params=[torch.ones(3), torch.tensor([1.0, float("nan")])], ema=None, config=config)
    with pytest.raises(TrainingDiverged, match="adapter weights became NaN or inf at step 5"):
        loop.check_weights(run, 5)
    run.params[1] = torch.zeros(2)
    loop.check_weights(run, 5)
    run.ema = types.SimpleNamespace(shadow=[torch.tensor([float("inf")])])
    with pytest.raises(TrainingDiverged):
        loop.check_weights(run, 5)


# --- Ctrl-C -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_to_the_command_saves_a_checkpoint_and_resumes_to_the_same_adapter(
        tiny_sd15_dir, photos, tmp_path, uninterrupted, signum, status, name):
    """A real SIGINT (Ctrl-C) or SIGTERM (a job manager's stop, the app's Cancel) to a training process, once its
    first progress line is written. It exits with status 128 + the signal's number and one line saying how to
    resume; resuming from the checkpoint it saved gives the uninterrupted adapter bit for bit. (Slow validation
    images after step 2 keep the run alive long enough for the signal to land mid-run.)"""
    out = tmp_path / "out"
    slow = dict(validation_prompt="a photo of sks dog", validation_steps=2, num_validation_images=4,
                validation_inference_steps=25)
    proc = start_cli(tiny_config(tiny_sd15_dir, photos, out, **SETTINGS, **slow))
    deadline = time.monotonic() + 180
    while not ((out / PROGRESS_FILE).exists() and (out / PROGRESS_FILE).read_text().endswith("\n")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no progress line"
        time.sleep(0.01)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"Stopped by {name} at step "), output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "--resume_from_checkpoint latest (same --output_dir)" in last
    saved = find_resume_checkpoint("latest", out)
    assert f"checkpoint-{saved.step} in {out} holds this state" in last
    assert f"at step {saved.step} of 6" in last and not (out / ADAPTER_FILE).exists()
    _resume_and_compare(tiny_sd15_dir, photos, out, uninterrupted)


def test_ctrl_c_during_gradient_accumulation_discards_the_partial_step(tiny_sd15_dir, photos, tmp_path, monkeypatch,
                                                                       uninterrupted):
    """SIGINT during the second micro-batch of step 4: the partial step is dropped, checkpoint-3 saved."""
    _sigint_at(monkeypatch, loop, "micro_step_loss", lambda run, batch, micro_step: micro_step == 3 * 2 + 1)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted) as err:
        run_training(tiny_config(tiny_sd15_dir, photos, out, **SETTINGS))
    assert str(err.value).startswith("Stopped by Ctrl-C at step 3 of 6 (the unfinished step 4 was discarded); "
                                     f"checkpoint-3 in {out} holds this state.")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # Resumed, and stopped again before a step finished: checkpoint-3 already holds that state, so it is not rewritten.
    written = (out / "checkpoint-3" / "state.json").stat().st_mtime_ns
    monkeypatch.undo()
    _sigint_at(monkeypatch, loop, "micro_step_loss", lambda run, batch, micro_step: micro_step == 3 * 2)
    with pytest.raises(TrainingInterrupted, match=r"at step 3 of 6 \(the unfinished step 4 was discarded\); "
                                                  "checkpoint-3 in .* holds this state"):
        run_training(tiny_config(tiny_sd15_dir, photos, out, resume_from_checkpoint="latest", **SETTINGS))
    assert (out / "checkpoint-3" / "state.json").stat().st_mtime_ns == written
    monkeypatch.undo()
    _resume_and_compare(tiny_sd15_dir, photos, out, uninterrupted)


def test_ctrl_c_during_the_optimizer_update_finishes_the_step_first(tiny_sd15_dir, photos, tmp_path, monkeypatch,
                                                                    uninterrupted):
    """SIGINT inside step 5's optimizer update, right after AdamW changed the weights (the schedule and the EMA
    not yet): they must change together, so the step is completed and checkpoint-5 holds it."""
    calls = []
    _sigint_at(monkeypatch, torch.optim.AdamW, "step", lambda *args: calls.append(1) or len(calls) == 5, after=True)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted) as err:
        run_training(tiny_config(tiny_sd15_dir, photos, out, **SETTINGS))
    assert "at step 5 of 6 (its optimizer update was finished first)" in str(err.value)
    assert find_resume_checkpoint("latest", out).step == 5
    monkeypatch.undo()
    _resume_and_compare(tiny_sd15_dir, photos, out, uninterrupted)


def test_a_second_ctrl_c_during_the_save_stops_at_once_and_corrupts_nothing(tiny_sd15_dir, photos, tmp_path,
                                                                            monkeypatch, uninterrupted):
    """First SIGINT in step 4 (checkpoint-3 is being saved), second one after the save's first file: the run stops
    with a plain KeyboardInterrupt, checkpoint-3 exists only as an unfinished .tmp folder, `latest` is still
    checkpoint-2, and resuming from it gives the uninterrupted adapter."""
    _sigint_at(monkeypatch, loop, "micro_step_loss", lambda run, batch, micro_step: micro_step == 3 * 2 + 1)
    real_save, saves = checkpoints.save_tensors, []

    def save_then_sigint(tensors, path, *args, **kwargs):
        written = real_save(tensors, path, *args, **kwargs)
        saves.append(Path(path))
        if Path(path).parent.name == "checkpoint-3.tmp":
            signal.raise_signal(signal.SIGINT)
        return written

    monkeypatch.setattr(checkpoints, "save_tensors", save_then_sigint)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as err:
        run_training(tiny_config(tiny_sd15_dir, photos, out, **SETTINGS))
    assert type(err.value) is KeyboardInterrupt
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3.tmp"]
    assert [p.name for p in (out / "checkpoint-3.tmp").iterdir()] == ["adapter.safetensors"]
    assert find_resume_checkpoint("latest", out).step == 2
    monkeypatch.undo()
    _resume_and_compare(tiny_sd15_dir, photos, out, uninterrupted)
    assert not (out / "checkpoint-3.tmp").exists()  # cleaned up by the next checkpoint


def test_ctrl_c_outside_the_training_loop_is_one_line_too(tiny_sd15_dir, photos, tmp_path, monkeypatch, capsys):
    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_base", interrupted_while_loading)
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(cli_args(tiny_config(tiny_sd15_dir, photos, tmp_path / "out")))
        status = exit_info.value.code
    finally:
        reset_accelerate()
    err = capsys.readouterr().err.strip()
    assert status == 130
    assert err == "Stopped by Ctrl-C; no checkpoint was saved, so a new run starts from step 0"
