"""Pretraining's code path end to end with a micro config (seconds; it learns nothing)."""

from __future__ import annotations

import json

import torch

from moslora_diffusion.toy.pretrain import PRESETS, main


def test_micro_pretrain_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "toy"
    torch.set_num_threads(1)
    main(["--out", str(out), "--preset", "micro", "--seed", "0", "--device", "cpu"])
    record = json.loads((out / "toy_pretrain.json").read_text())
    assert record["config"]["unet_steps"] == PRESETS["micro"].unet_steps
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
