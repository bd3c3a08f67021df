"""End-to-end DreamBooth runs on tiny SD 1.x / SD 2.x / SDXL models: outputs, LoRA loading, learning, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import (
    PROMPT,
    adapter_weights,
    make_photos,
    run_training,
    tiny_config,
)

from moslora_diffusion import read_adapter
from moslora_diffusion.files.safetensors_io import load_tensors

OUTPUTS = ("moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md",
           "training_config.json")


def _images(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def lora_image_change(model_dir, output_dir, sdxl: bool) -> float:
    """Max pixel change when diffusers' own loader applies the exported LoRA to the base model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    pipe.load_lora_weights(str(output_dir))
    return float(np.abs(_images(pipe) - before).max())


def assert_outputs(config, family: str, text_components: tuple[str, ...] = ()) -> None:
    out = Path(config.output_dir)
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["config"] == json.loads(json.dumps(config.to_dict()))
    assert recorded["plan"]["family"] == family
    adapter = read_adapter(out / "moslora.safetensors")
    assert adapter.info["family"] == family
    assert adapter.info["base_model"] == config.pretrained_model_name_or_path
    assert adapter.info["instance_prompt"] == PROMPT
    assert set(adapter.weights) == {"unet", *text_components}
    diffusers_keys = load_tensors(out / "pytorch_lora_weights.safetensors")[0].keys()
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", *text_components}
    card = (out / "README.md").read_text()
    for expected in (PROMPT, config.pretrained_model_name_or_path, "load_lora_weights", "models/Lora", "LoraLoader"):
        assert expected in card


def test_sd1_run_writes_every_output_and_skips_a_corrupt_photo(tiny_sd15_dir, tmp_path, capsys):
    photos = make_photos(tmp_path / "photos", count=2)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", max_train_steps=3, validation_prompt=PROMPT,
                         validation_steps=2, num_validation_images=1)
    result = run_training(config)
    assert f"Photos: 2 used from {photos}, 1 files skipped\n  skipped broken.jpg: " in capsys.readouterr().out

    assert result.steps == 3 and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert_outputs(config, "sd1")
    validation = sorted(p.name for p in (Path(config.output_dir) / "validation").iterdir())
    assert validation == ["step-000002-0.png", "step-000003-0.png"]
    assert "validation/step-000003-0.png" in (Path(config.output_dir) / "README.md").read_text()
    progress = [json.loads(line) for line in (Path(config.output_dir) / "progress.jsonl").read_text().splitlines()]
    assert [(r["step"], r["total"]) for r in progress if "loss" in r] == [(1, 3), (2, 3), (3, 3)]
    assert [r["validation_images"] for r in progress if "validation_images" in r] == [
        ["validation/step-000002-0.png"], ["validation/step-000003-0.png"]]
    kohya = load_tensors(Path(config.output_dir) / "lora_kohya.safetensors")[0]
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
    assert lora_image_change(tiny_sd15_dir, config.output_dir, sdxl=False) > 1e-3


def test_sd1_prior_preservation_with_text_encoder(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos"), tmp_path / "out",
                         with_prior_preservation=True, class_prompt="a photo of a dog",
                         class_data_dir=str(tmp_path / "class"), num_class_images=2, train_text_encoder=True,
                         text_encoder_lr=5e-3)
    run_training(config)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # generated with the base model
    assert_outputs(config, "sd1", ("text_encoder",))
    assert lora_image_change(tiny_sd15_dir, config.output_dir, sdxl=False) > 1e-3


def test_sdxl_prior_preservation_with_both_text_encoders(tiny_sdxl_dir, tmp_path):
    config = tiny_config(tiny_sdxl_dir, make_photos(tmp_path / "photos"), tmp_path / "out",
                         with_prior_preservation=True, class_prompt="a photo of a dog",
                         class_data_dir=str(tmp_path / "class"), num_class_images=2, train_text_encoder=True)
    run_training(config)
    assert_outputs(config, "sdxl", ("text_encoder", "text_encoder_2"))
    kohya = load_tensors(Path(config.output_dir) / "lora_kohya.safetensors")[0]
    assert {k.split("_")[1] for k in kohya} >= {"unet", "te1", "te2"}
    assert lora_image_change(tiny_sdxl_dir, config.output_dir, sdxl=True) > 1e-3


def test_sdxl_buckets_cached_latents_and_ema(tiny_sdxl_dir, tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos, count=1, size=(64, 32))
    make_photos(photos / "2_sks dog", count=1, size=(32, 64), seed=5)  # kohya repeats folder
    config = tiny_config(tiny_sdxl_dir, photos, tmp_path / "out", enable_bucket=True, cache_latents=True,
                         use_ema=True, max_train_steps=3)
    result = run_training(config)
    assert_outputs(config, "sdxl")
    assert result.steps == 3
    assert lora_image_change(tiny_sdxl_dir, config.output_dir, sdxl=True) > 1e-4


def test_sd2_v_prediction_min_snr_accumulation_bf16(tiny_sd2_dir, tmp_path):
    config = tiny_config(tiny_sd2_dir, make_photos(tmp_path / "photos"), tmp_path / "out", snr_gamma=5.0,
                         noise_offset=0.05, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=1,
                         gradient_checkpointing=True, mixed_precision="bf16", adapter="lora")
    result = run_training(config)
    assert all(math.isfinite(x) for x in result.losses)
    weights = adapter_weights(config.output_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert any(k.endswith("moslora_B") and t.abs().max() > 0 for k, t in weights.items())
    plan = json.loads((Path(config.output_dir) / "training_config.json").read_text())["plan"]
    assert plan["prediction_type"] == "v_prediction" and plan["effective_batch"] == 2


def test_overfitting_one_image_lowers_the_loss(tiny_sd15_dir, tmp_path):
    """50 steps on one photo. The first 10 steps are the lr warm-up, i.e. the loss of the (almost) untrained
    model; the mean of the last 10 must be below 0.6 of it. High timesteps only (900..999), where the
    noise prediction is learnable by a tiny model within 50 steps; every adaptable layer ("all")."""
    config = tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos", count=1), tmp_path / "out",
                         max_train_steps=50, learning_rate=3e-2, lr_scheduler="constant_with_warmup",
                         lr_warmup_steps=10, min_timestep=900, max_timestep=1000, target_modules="all",
                         logging_steps=10)
    losses = run_training(config).losses
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, (first, last)


@pytest.fixture
def loaded_bases(monkeypatch) -> list:
    """Every BaseModel train() loads, in order: to inspect the modules a run trained."""
    import moslora_diffusion.training.trainer.loop as loop

    bases = []
    real_load_base = loop.load_base
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: bases.append(real_load_base(*a, **k)) or bases[-1])
    return bases


def test_channels_last_unet_learns_the_same(tiny_sd15_dir, tmp_path, loaded_bases):
    """--channels_last (the default on CUDA) changes the memory layout of the UNet's convolutions, not the run."""
    from moslora_diffusion.training.model.components import use_channels_last

    bases = loaded_bases
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    runs = {}
    for layout in (False, True):
        runs[layout] = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / str(layout), max_train_steps=4,
                                                channels_last=layout)).losses
    weight = bases[1].unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert bases[0].unet.conv_in.weight.is_contiguous()
    assert len(set(runs[False])) > 1
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4, atol=1e-6)
    default = tiny_config(tiny_sd15_dir, photos, tmp_path / "x")
    assert not use_channels_last(default, torch.device("cpu")) and use_channels_last(default, torch.device("cuda"))


def test_fp8_base_trains_with_float8_unet_weights(tiny_sdxl_dir, tmp_path, loaded_bases):
    """--fp8_base: the frozen UNet's linear/conv weights are float8 while training, the adapters stay fp32 and
    learn, validation images come out, and the losses stay near the bf16 run's (float8 rounds the base only)."""
    from moslora_diffusion.moslora.layer import MoSLoRALinear

    bases = loaded_bases
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    losses = {}
    for fp8 in (False, True):
        config = tiny_config(tiny_sdxl_dir, photos, tmp_path / f"fp8-{fp8}", max_train_steps=4, mixed_precision="bf16",
                             gradient_checkpointing=True, fp8_base=fp8, validation_prompt=PROMPT,
                             num_validation_images=1, validation_steps=1000)
        losses[fp8] = run_training(config).losses
        assert (Path(config.output_dir) / "moslora.safetensors").is_file()
    unet = bases[1].unet
    adapters = [m for m in unet.modules() if isinstance(m, MoSLoRALinear)]
    assert adapters and all(m.base_layer.weight.dtype == torch.float8_e4m3fn for m in adapters)
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn and unet.conv_norm_out.weight.dtype == torch.bfloat16
    assert all(m.lora_A.dtype == torch.float32 and m.lora_B.abs().max() > 0 for m in adapters)  # trained
    assert list(Path(tmp_path / "fp8-True").rglob("*.png"))  # validation ran on the float8 UNet
    assert losses[True] != losses[False] and all(math.isfinite(v) for v in losses[True])
    np.testing.assert_allclose(losses[True], losses[False], rtol=0.02)  # measured: within 0.5%


def test_torch_compile_trains_the_same(tiny_sd15_dir, tmp_path, monkeypatch, loaded_bases):
    """--torch_compile: the UNet's training steps run as compiled graphs (gradient checkpointing included), the
    validation in between runs eagerly without compiling anything, and the adapters learn what the eager run's
    learn. aot_eager traces exactly what inductor would compile, without a C++ toolchain's minutes."""
    import torch._dynamo.utils as dynamo_utils

    import moslora_diffusion.training.trainer.loop as loop

    bases = loaded_bases
    validations = []
    real_validation = loop.run_validation

    def counting_validation(*args, **kwargs):
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        paths = real_validation(*args, **kwargs)
        validations.append(dynamo_utils.counters["stats"]["unique_graphs"] - before)
        return paths

    monkeypatch.setattr(loop, "run_validation", counting_validation)
    photos = make_photos(tmp_path / "photos", count=2, size=(32, 32))
    losses, adapters = {}, {}
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    try:
        for compiled in (False, True):
            config = tiny_config(tiny_sd15_dir, photos, tmp_path / f"compiled-{compiled}", max_train_steps=4,
                                 gradient_checkpointing=True, torch_compile=compiled, dynamo_backend="aot_eager",
                                 validation_prompt=PROMPT, num_validation_images=1, validation_steps=2)
            losses[compiled] = run_training(config).losses
            adapters[compiled] = adapter_weights(config.output_dir)
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert bases[1].unet._compiled_call_impl is not None and bases[0].unet._compiled_call_impl is None
    assert graphs == 1, graphs  # the whole UNet step in one graph: no graph breaks, no recompiles
    assert validations == [0, 0, 0, 0], validations  # mid-run and final, both runs: eager, nothing compiled
    assert len(set(losses[False])) > 1
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4, atol=1e-6)
    assert adapters[True].keys() == adapters[False].keys()
    for key, eager in adapters[False].items():
        assert eager.abs().max() > 0, key  # trained: B moved off zero, so the comparison is not trivially true
        torch.testing.assert_close(adapters[True][key], eager, rtol=1e-3, atol=1e-5, msg=key)


def test_torch_compile_without_a_toolchain_fails_before_loading_anything(tiny_sd15_dir, tmp_path, monkeypatch):
    """inductor on CPU needs a C++ compiler: its absence is a one-line error before the model load, not a
    failure at the first step after the class images."""
    import torch._inductor.cpp_builder as cpp_builder

    import moslora_diffusion.training.trainer.loop as loop
    from moslora_diffusion.training import ConfigError
    from moslora_diffusion.training.model.components import check_compile_toolchain

    def no_compiler():
        raise RuntimeError("no C++ compiler found in search path")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    photos = make_photos(tmp_path / "photos", count=1, size=(32, 32))
    config = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", torch_compile=True)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler .*no C\\+\\+ compiler found"):
        run_training(config)
    assert not (tmp_path / "out").exists()
    tracing_only = tiny_config(tiny_sd15_dir, photos, tmp_path / "out", torch_compile=True,
                               dynamo_backend="aot_eager")
    check_compile_toolchain(tracing_only, torch.device("cpu"))  # aot_eager builds nothing: no toolchain needed


def test_fp8_base_needs_autocast(tiny_sd15_dir, tmp_path):
    from moslora_diffusion.training import ConfigError

    with pytest.raises(ConfigError, match="--fp8_base needs --mixed_precision"):
        tiny_config(tiny_sd15_dir, tmp_path, tmp_path / "out", fp8_base=True)


def test_fp16_on_a_cpu_is_one_line_of_ours_not_diffusers_paragraph_per_module(tiny_sd15_dir, tmp_path, caplog):
    """diffusers warned once per fp16 module moved to the CPU (three paragraphs); the base now loads with one warning
    of ours naming the flag and the CPU's choices, the weights still fp16 (the run works)."""
    import logging
    import warnings

    from moslora_diffusion.training.model.components import load_base

    config = tiny_config(tiny_sd15_dir, tmp_path, tmp_path / "run", mixed_precision="fp16")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        base = load_base(config, torch.device("cpu"))
    ours = [str(w.message) for w in caught if "mixed_precision" in str(w.message)]
    assert ours == ["--mixed_precision fp16 on a CPU: half precision is meant for a GPU (few CPU kernels); on a CPU "
                    "use --mixed_precision no (fp32) or bf16"]
    assert not [r for r in caplog.records if "float16" in r.getMessage()]
    assert base.pipe.unet.dtype == torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_base(tiny_config(tiny_sd15_dir, tmp_path, tmp_path / "run"), torch.device("cpu"))
    assert not [w for w in caught if "mixed_precision" in str(w.message)]  # fp32: nothing to say
