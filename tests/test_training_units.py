"""The training pieces on their own: validation safety, EMA, loss weighting, rank-independent batches and noise."""

from __future__ import annotations

import itertools

import pytest
import torch
from training_helpers import PROMPT, make_photos, reset_accelerate, tiny_config  # noqa: F401

from moslora_diffusion.moslora.inject import adapter_parameters
from moslora_diffusion.moslora.pipeline import pipeline_adapters
from moslora_diffusion.training.model.components import attach_adapters, load_base
from moslora_diffusion.training.model.conditioning import PromptConditioning
from moslora_diffusion.training.model.ema import AdapterEMA
from moslora_diffusion.training.step.batches import GlobalBatchStream
from moslora_diffusion.training.step.objective import RowLayout, diffusion_loss, min_snr_weights, step_generator
from moslora_diffusion.training.trainer.validation import run_validation


def _trained_looking_base(model_dir, tmp_path, **overrides):
    """A base model in bf16 with fp32 adapters whose B is non-zero (so a cast or a copy would show)."""
    settings = {"mixed_precision": "bf16", "validation_prompt": PROMPT, "num_validation_images": 2, **overrides}
    config = tiny_config(model_dir, make_photos(tmp_path / "photos", 1), tmp_path / "out", **settings)
    base = load_base(config, torch.device("cpu"))
    trainable = attach_adapters(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layers in pipeline_adapters(base.pipe).values():
            for layer in layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return config, base, [p for params in trainable.values() for p in params]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_validation_leaves_adapter_weights_bit_identical_and_fp32(family, tiny_dirs, tmp_path):
    from accelerate import Accelerator

    config, base, params = _trained_looking_base(tiny_dirs[family], tmp_path, train_text_encoder=True)
    ema = AdapterEMA(params, 0.9)
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.5)  # EMA weights that differ from the live ones: they are swapped in and out
    before = [p.detach().clone() for p in params]
    base_weight = base.unet.conv_in.weight.detach().clone()
    reset_accelerate()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        paths = run_validation(base.pipe, config, 32, step=7, accelerator=accelerator, ema=ema)
    finally:
        reset_accelerate()
    assert [p.name for p in paths] == ["step-000007-0.png", "step-000007-1.png"]
    for param, saved in zip(params, before, strict=True):
        assert param.dtype == torch.float32 and param.requires_grad
        assert torch.equal(param, saved)
    assert base.unet.conv_in.weight.dtype == torch.bfloat16 and torch.equal(base.unet.conv_in.weight, base_weight)
    assert base.unet.training


def test_ema_warms_up_and_swaps_back_exactly():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([param], decay=0.99)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()  # first decay is min(0.99, 1/10): the shadow moves 90% of the way
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    with ema.swapped_in():
        assert torch.allclose(param, torch.full((3,), 0.9))
    assert torch.equal(param, torch.ones(3))


def test_min_snr_weights_only_the_instance_rows():
    alphas = torch.linspace(0.99, 0.01, 1000)
    timesteps = torch.tensor([10, 900, 10, 900])  # two instance rows, then two class rows
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    target[2:] *= 2.0  # class rows: per-row MSE 4
    loss = diffusion_loss(pred, target, timesteps, 2, alphas, "epsilon", snr_gamma=5.0, prior_loss_weight=0.5)
    weights = min_snr_weights(timesteps[:2], alphas, 5.0, "epsilon")
    assert torch.allclose(loss, weights.mean() + 0.5 * 4.0)
    snr = alphas[timesteps[:2]] / (1 - alphas[timesteps[:2]])
    assert torch.allclose(weights, snr.clamp(max=5.0) / snr)
    v_weights = min_snr_weights(timesteps[:2], alphas, 5.0, "v_prediction")
    assert torch.allclose(v_weights, snr.clamp(max=5.0) / (snr + 1))


def test_two_ranks_draw_the_rows_of_one_process():
    one = RowLayout(per_device=4, num_processes=1, process_index=0, groups=2)
    ranks = [RowLayout(per_device=2, num_processes=2, process_index=r, groups=2) for r in range(2)]
    full = one.randn((3,), step_generator(0, 5, torch.device("cpu")))  # [inst0..3, class0..3]
    parts = [rank.randn((3,), step_generator(0, 5, torch.device("cpu"))) for rank in ranks]
    # rank r holds instances 2r, 2r+1 and their class rows
    assert torch.equal(torch.cat([parts[0][:2], parts[1][:2]]), full[:4])
    assert torch.equal(torch.cat([parts[0][2:], parts[1][2:]]), full[4:])
    assert not torch.equal(full, one.randn((3,), step_generator(0, 6, torch.device("cpu"))))


def test_global_batches_are_the_same_for_any_process_count_and_resume_mid_stream():
    bucket_ids = [0, 0, 0, 1, 1, 0, 1]
    single = GlobalBatchStream(bucket_ids, per_device=2, num_processes=1, process_index=0, seed=3)
    pair = [GlobalBatchStream(bucket_ids, per_device=1, num_processes=2, process_index=r, seed=3) for r in range(2)]
    steps = 3 * single.batches_per_epoch  # three epochs
    one = list(itertools.islice(single, steps))
    per_rank = [list(itertools.islice(stream, steps)) for stream in pair]
    assert [a + b for a, b in zip(*per_rank, strict=True)] == one
    assert all(len({bucket_ids[i] for _, i in batch}) == 1 for batch in one)  # one bucket per global batch
    assert one[0] != one[single.batches_per_epoch]  # reshuffled every epoch
    resumed = GlobalBatchStream(bucket_ids, 2, 1, 0, seed=3, start=4)
    assert list(itertools.islice(resumed, steps - 4)) == one[4:]


def test_cached_prompt_embeddings_equal_fresh_ones(tiny_sdxl_dir, tmp_path):
    _, base, _ = _trained_looking_base(tiny_sdxl_dir, tmp_path, mixed_precision="no")
    fresh = PromptConditioning(base.family, base.tokenizers, base.text_encoders, torch.device("cpu"), cache=False)
    cached = PromptConditioning(base.family, base.tokenizers, base.text_encoders, torch.device("cpu"), cache=True)
    cached.precompute([PROMPT, "a dog"])
    batch = {"prompts": [PROMPT, "a dog", PROMPT], "original_sizes": torch.tensor([[40, 48]] * 3),
             "crop_top_lefts": torch.tensor([[0, 8]] * 3), "target_sizes": torch.tensor([[32, 32]] * 3)}
    with torch.no_grad():
        a, b = fresh.unet_kwargs(batch, torch.float32), cached.unet_kwargs(batch, torch.float32)
    assert torch.allclose(a["encoder_hidden_states"], b["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(a["added_cond_kwargs"]["text_embeds"], b["added_cond_kwargs"]["text_embeds"], atol=1e-6)
    assert b["added_cond_kwargs"]["time_ids"].tolist()[0] == [40, 48, 0, 8, 32, 32]
    assert b["encoder_hidden_states"].shape[-1] == sum(e.config.hidden_size for e in base.text_encoders)
    assert not adapter_parameters(base.text_encoders[0])  # frozen encoders: nothing attached there


def test_the_final_loss_line_gives_the_last_step_and_the_recent_mean():
    """"Final loss" was the last step's value alone, unlike the bar's interval mean: two numbers, no explanation."""
    from moslora_diffusion.training.trainer.loop import final_loss_line

    losses = [1.0] * 5 + [0.2, 0.4, 0.1, 0.3, 0.2, 0.6, 0.1, 0.5, 0.3, 0.4, 0.25]
    assert final_loss_line(losses) == ("Final loss: 0.2500 at the last step; mean of the last 10 steps 0.3150 (one "
                                       "step's loss varies with its random timestep and noise)")
    assert final_loss_line([0.5, 0.3]).startswith("Final loss: 0.3000 at the last step; mean of the last 2 steps 0.40")
    assert final_loss_line([0.7]) == "Final loss: 0.7000"
