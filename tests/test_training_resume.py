"""Checkpoints and processes: a killed run resumes to the same result; 2 processes train like 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import (
    adapter_weights,
    make_photos,
    # noqa: F401 (autouse fixture)
    run_training,
    start_cli,
    tiny_config,
    wait_for,
)

from moslora_diffusion.training.run_folder.checkpoints import (
    CheckpointError,
    find_resume_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tiny_sd15_dir, tmp_path):
    """6 steps with a checkpoint at 3 (batch 1, gradient accumulation 2, EMA, linear schedule). The second
    copy runs as a subprocess, is SIGKILLed as soon as checkpoint-3 exists, and is resumed with `latest`: on
    CPU with the same thread count its final adapter equals the uninterrupted run's bit for bit."""
    photos = make_photos(tmp_path / "photos", count=3)
    settings = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, use_ema=True,
                    learning_rate=1e-3, lr_scheduler="linear")
    uninterrupted = tiny_config(tiny_sd15_dir, photos, tmp_path / "a", **settings)
    run_training(uninterrupted)

    # The copy to be killed also validates right after the checkpoint: validation changes nothing in training
    # (validation settings may differ in a resumed run), and its seconds of image generation give the kill
    # below a wide window between checkpoint-3 and the end.
    slow = dict(validation_prompt="a photo of sks dog", validation_steps=4, num_validation_images=4,
                validation_inference_steps=25)
    proc = start_cli(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", **settings, **slow))
    wait_for(tmp_path / "b" / "checkpoint-3", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "moslora.safetensors").exists()
    for later in (tmp_path / "b").glob("checkpoint-6*"):  # in case it got that far before the kill landed
        shutil.rmtree(later)

    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", resume_from_checkpoint="latest",
                                       **settings))
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("moslora_B"))


def _checkpoint(folder: Path, step: int) -> Path:
    state = {"family": "sd1", "adapter": {"rank": 4}, "targets": {"unet": ["x"]}}
    return save_checkpoint(folder, step, state, {"adapter": {"unet.x.A": torch.ones(2)}},
                           {"optimizer": {"state": {}}})


def test_latest_only_picks_complete_checkpoints_and_the_limit_prunes_old_ones(tmp_path):
    for step in (2, 4):
        _checkpoint(tmp_path, step)
    # safetensors and JSON only: resuming from a checkpoint someone hands us can never unpickle code
    assert sorted(p.name for p in (tmp_path / "checkpoint-4").iterdir()) == [
        "adapter.safetensors", "optimizer.state.safetensors", "state.json"]
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-6.tmp")  # killed before the rename
    missing_file = shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    state = json.loads((missing_file / "state.json").read_text())
    (missing_file / "state.json").write_text(json.dumps({**state, "step": 8}))
    (missing_file / "optimizer.state.safetensors").unlink()
    no_state = shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-9")
    (no_state / "state.json").unlink()

    with pytest.warns(UserWarning, match="incomplete"):
        latest = find_resume_checkpoint("latest", tmp_path)
    assert latest.step == 4
    for bad in ("checkpoint-6.tmp", "checkpoint-8", "checkpoint-9", "checkpoint-99"):
        with pytest.raises(CheckpointError):
            read_checkpoint(tmp_path / bad)
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8", "checkpoint-9"]


@pytest.mark.parametrize("prior_source", ["class_images", "base_model"])
def test_two_processes_train_like_one_process_with_the_same_global_batch(tiny_sdxl_dir, tmp_path, prior_source):
    """2 CPU processes (torchrun + gloo) with batch 1 against 1 process with batch 2, on SDXL with both text
    encoders trained, prior preservation (class images, or the base model's predictions) and Min-SNR. Same
    images, noise and timesteps per global step, so the results differ only by float32 rounding (the
    all-reduce adds gradients in another order), which Adam's normalised steps carry into the weights: every
    weight agrees within 2e-5 (2% of one Adam step at lr 1e-3), and B (initialised to 0, so it is the learned
    part) within 0.1% in norm."""
    photos = make_photos(tmp_path / "photos", count=4)
    class_dir = make_photos(tmp_path / "class", count=2, seed=10)  # supplied, so nothing is generated
    settings = dict(max_train_steps=3, learning_rate=1e-3, snr_gamma=5.0, train_text_encoder=True,
                    with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=str(class_dir),
                    num_class_images=2, prior_source=prior_source)
    single = run_training(tiny_config(tiny_sdxl_dir, photos, tmp_path / "one", train_batch_size=2, **settings))

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = start_cli(tiny_config(tiny_sdxl_dir, photos, tmp_path / "two", train_batch_size=1, **settings),
                     launcher=launcher, ACCELERATE_USE_CPU="true")  # accelerate's switch for gloo on CPU
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    recorded = json.loads((tmp_path / "two" / "training_config.json").read_text())
    assert recorded["plan"]["num_processes"] == 2 and recorded["plan"]["global_batch"] == 2
    assert recorded["result"]["final_loss"] == pytest.approx(single.losses[-1], rel=1e-5)
    one, two = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5)
        if key.endswith("moslora_B"):
            assert (two[key] - one[key]).norm() <= 1e-3 * one[key].norm()
