"""--validation_loss_photos: photos set aside (never trained on), a held-out loss at fixed noise and timesteps at
every validation, logged as val_loss to progress.jsonl and TensorBoard; bad values refused before anything runs."""

from __future__ import annotations

import json
import math
import sys

import pytest
from training_helpers import make_photos, run_training, start_cli, tiny_config

from moslora_diffusion.data import scan_photos
from moslora_diffusion.training.settings.config import ConfigError
from moslora_diffusion.training.trainer import loop
from moslora_diffusion.training.trainer.held_out import HeldOutLoss, held_out_indices, split_held_out


def names(records) -> list[str]:
    return [r.path.name for r in records]


def test_split_sets_photos_aside_evenly_and_deterministically(tmp_path):
    scan = scan_photos(make_photos(tmp_path / "photos", count=7), "a photo of sks dog")
    kept, held = split_held_out(scan, 2)
    assert names(held) == ["photo_1.png", "photo_5.png"]  # the middles of two equal halves of the sorted list
    assert set(names(kept.records)).isdisjoint(names(held)) and len(kept.records) == 5
    assert sorted(names(kept.records) + names(held)) == sorted(names(scan.records))
    assert names(split_held_out(scan, 2)[1]) == names(held)  # the same photos every time
    assert split_held_out(scan, 0) == (scan, [])
    assert held_out_indices(3, 3) == [0, 1, 2] and held_out_indices(1, 4) == [2]


def test_held_out_loss_is_logged_at_every_validation_and_repeats_for_the_same_weights(tiny_sd15_dir, tmp_path,
                                                                                     monkeypatch):
    photos = make_photos(tmp_path / "photos", count=4, size=(32, 32))
    out = tmp_path / "run"
    trained_on, checks = [], []
    build_dataset = loop.build_dataset

    def recording_build_dataset(config, records, *args):
        trained_on.extend(r.path.name for r in records)
        return build_dataset(config, records, *args)

    log_held_out_loss = loop.log_held_out_loss

    def checking_log(run, step):
        # the same weights scored twice, and by rows drawn afresh from the seed: bit-identical values
        checks.append((run.held_out.loss(run), HeldOutLoss(run, run.held_out.records).loss(run)))
        return log_held_out_loss(run, step)

    monkeypatch.setattr(loop, "build_dataset", recording_build_dataset)
    monkeypatch.setattr(loop, "log_held_out_loss", checking_log)
    config = tiny_config(tiny_sd15_dir, photos, out, max_train_steps=3, validation_steps=1,
                         validation_loss_photos=2, report_to="tensorboard")
    run_training(config)
    assert sorted(trained_on) == ["photo_0.png", "photo_2.png"]  # photo_1 and photo_3 held out
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    held = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in held] == [1, 2, 3]  # every validation step, the final one included
    assert all(math.isfinite(v) and v > 0 for _, v in held)
    assert [v for _, v in held] == [first for first, _ in checks]  # the logged value is the checked one
    assert all(first == again for first, again in checks)
    assert len({v for _, v in held}) == 3  # the adapter (B != 0 after step 1) changes the number
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(s, pytest.approx(v)) for s, v in held]


@pytest.mark.parametrize(("count", "message"), [
    (-1, "--validation_loss_photos must be"),
    (2, "--validation_loss_photos 2 leaves 1 of the 3 photos .* keep at least 2"),
])
def test_bad_held_out_counts_are_refused_before_anything_is_written(tiny_sd15_dir, tmp_path, count, message):
    photos = make_photos(tmp_path / "photos", count=3)
    with pytest.raises(ConfigError, match=message):
        run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "run", validation_loss_photos=count))
    assert not (tmp_path / "run").exists()


def test_held_out_loss_on_sdxl_with_trained_text_encoders_and_ema(tiny_sdxl_dir, tmp_path):
    """SDXL's size conditioning and text encoders that train (prompts embedded at every score, not cached)."""
    out = tmp_path / "run"
    config = tiny_config(tiny_sdxl_dir, make_photos(tmp_path / "photos", count=3, size=(32, 32)), out,
                         max_train_steps=2, validation_steps=1, validation_loss_photos=1, train_text_encoder=True,
                         use_ema=True, ema_decay=0.5)
    run_training(config)
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    held = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in held] == [1, 2] and all(math.isfinite(v) and v > 0 for _, v in held)


def test_two_processes_score_the_held_out_loss_like_one(tiny_sdxl_dir, tmp_path):
    """torchrun + gloo, 2 CPU processes with batch 1 against 1 process with batch 2 (the same global batches):
    every process scores the held-out rows through its DDP-wrapped UNet and text encoders (collective forwards,
    no hang), and the logged val_loss matches the single process's within float32 rounding of the weights."""
    photos = make_photos(tmp_path / "photos", count=4, size=(32, 32))
    settings = dict(max_train_steps=2, learning_rate=1e-3, validation_steps=1, validation_loss_photos=1,
                    train_text_encoder=True)
    run_training(tiny_config(tiny_sdxl_dir, photos, tmp_path / "one", train_batch_size=2, **settings))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = start_cli(tiny_config(tiny_sdxl_dir, photos, tmp_path / "two", train_batch_size=1, **settings),
                     launcher=launcher, ACCELERATE_USE_CPU="true")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output

    def held_out(out):
        lines = (out / "progress.jsonl").read_text().splitlines()
        return [(r["step"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]

    one, two = held_out(tmp_path / "one"), held_out(tmp_path / "two")
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2]  # logged once, by the main process
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4)
