"""Prior preservation without class images (--prior_source base_model): the class rows' target is exactly the
base model's prediction, the loss is the instance loss + weight * MSE, the term's gradient reaches the adapters,
no class image is written, and a resumed run is bit for bit the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters
from training_helpers import PROMPT, adapter_weights, make_photos, reset_accelerate, run_training, tiny_config

from moslora_diffusion.data import scan_photos
from moslora_diffusion.moslora.pipeline import pipeline_adapters
from moslora_diffusion.training.model.components import attach_adapters, load_base
from moslora_diffusion.training.model.conditioning import PromptConditioning, tokenizer_names
from moslora_diffusion.training.model.trainable import AdapterTrainable
from moslora_diffusion.training.settings.config import preserves_base_output, uses_class_images
from moslora_diffusion.training.step.output_preservation import adapters_off, preservation_prompt
from moslora_diffusion.training.trainer.loop import make_accelerator, micro_step_loss, prepare_run
from moslora_diffusion.training.trainer.plan import training_resolution
from moslora_diffusion.training.trainer.run import start_batches

CLASS_PROMPT = "a photo of a dog"
ROWS = 2  # instance rows per micro-batch in these tests


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _set_up_run(model_dir, tmp_path, train_text_encoder: bool, caption: str = f"{PROMPT} on the grass", **settings):
    """A run ready to step (batch 2: one photo captioned with the bare instance prompt, one with `caption`), then
    every adapter given a non-zero B so the adapted and base models differ."""
    photos = make_photos(tmp_path / "photos", count=ROWS)
    (photos / "photo_1.txt").write_text(caption)
    settings = {"prior_loss_weight": 0.5, "snr_gamma": 5.0, **settings}
    config = tiny_config(model_dir, photos, tmp_path / "out", train_batch_size=ROWS, with_prior_preservation=True,
                         prior_source="base_model", class_prompt=CLASS_PROMPT, train_text_encoder=train_text_encoder,
                         **settings)
    accelerator = make_accelerator(config)
    base = load_base(config, accelerator.device)
    trainable = AdapterTrainable(base, config, attach_adapters(base, config))
    scan = scan_photos(config.instance_data_dir, config.instance_prompt)
    run, batches = prepare_run(config, accelerator, base, trainable, [scan], None, training_resolution(config, base),
                               "test")
    start_batches(run, *batches)
    randomize_adapters(base.pipe)
    return run


def _record_class_rows(run) -> dict:
    """Wraps run.preservation.add_class_rows to keep what it was given and what it returned."""
    seen, add = {}, run.preservation.add_class_rows

    def recorded(batch, noisy, target, timesteps):
        seen["given"] = (batch, noisy, timesteps)
        seen["returned"] = add(batch, noisy, target, timesteps)
        return seen["returned"]

    run.preservation.add_class_rows = recorded
    return seen


@torch.no_grad()
def _prediction_without_adapters(model_dir, family, prompts, noisy, timesteps, sizes: dict) -> torch.Tensor:
    """The UNet's prediction from a freshly loaded pipeline that never had an adapter attached. Each prompt encoded
    on its own, as the trainer's cache does (a batch of two rounds SDXL's pooled projection differently)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    conditioning = PromptConditioning(family, [getattr(pipe, n) for n in tokenizer_names(family)],
                                      [getattr(pipe, n) for n in family.text_encoders], torch.device("cpu"), cache=True)
    kwargs = conditioning.unet_kwargs({"prompts": prompts, **sizes}, torch.float32)
    return pipe.unet(noisy, timesteps, **kwargs, return_dict=False)[0]


def test_preservation_prompt_swaps_the_instance_prompt_for_the_class_prompt():
    assert preservation_prompt("a photo of sks star on the left", "a photo of sks star",
                               "a photo of a star") == "a photo of a star on the left"
    assert preservation_prompt("sks star, studio light", "a photo of sks star", "a photo of a star") == (
        "a photo of a star")


@pytest.mark.parametrize(("model", "train_text_encoder"), [("sd15", True), ("sdxl", True), ("sd15", False)])
def test_output_preservation_at_scale_0_is_exactly_the_base_prediction(tiny_dirs, tmp_path, model,
                                                                       train_text_encoder):
    run = _set_up_run(tiny_dirs[model], tmp_path, train_text_encoder)
    if not train_text_encoder:  # encoded before the steps, as the captions are: the encoders may leave the GPU
        assert {CLASS_PROMPT, f"{CLASS_PROMPT} on the grass"} <= set(run.conditioning._embedded)
    seen = _record_class_rows(run)
    micro_step_loss(run, next(run.batches), 0)
    (batch, noisy, timesteps), (rows, rows_noisy, rows_target, rows_timesteps) = seen["given"], seen["returned"]

    assert rows["prompts"][:ROWS] == batch["prompts"]
    assert sorted(rows["prompts"][ROWS:]) == [CLASS_PROMPT, f"{CLASS_PROMPT} on the grass"]
    assert rows["prompts"][ROWS:] == [c.replace(PROMPT, CLASS_PROMPT) for c in batch["prompts"]]
    assert torch.equal(rows_noisy, torch.cat([noisy, noisy])) and torch.equal(rows_timesteps, timesteps.repeat(2))
    assert not rows_target.requires_grad

    sizes = {k: batch[k] for k in ("original_sizes", "crop_top_lefts", "target_sizes") if k in batch}
    base = _prediction_without_adapters(tiny_dirs[model], run.base.family, rows["prompts"][ROWS:], noisy, timesteps,
                                        sizes)
    assert torch.equal(rows_target[ROWS:], base)
    # ... and the adapters are on outside the switch (B != 0): the adapted prediction is far from the base one.
    layers = [layer for found in pipeline_adapters(run.base.pipe).values() for layer in found.values()]
    assert {layer.scale for layer in layers} == {1.0}
    with torch.no_grad():
        kwargs = run.conditioning.unet_kwargs({"prompts": rows["prompts"][ROWS:], **sizes}, torch.float32)
        adapted = run.base.unet(noisy, timesteps, **kwargs, return_dict=False)[0]
    assert (adapted - base).abs().max() > 1e-2


def test_loss_is_the_instance_loss_plus_weighted_mse_and_its_gradient_reaches_the_adapters(tiny_sd15_dir, tmp_path):
    run = _set_up_run(tiny_sd15_dir, tmp_path, train_text_encoder=True)
    seen = _record_class_rows(run)
    batch = next(run.batches)
    total = micro_step_loss(run, batch, 0)
    preservation, run.preservation = run.preservation, None
    instance = micro_step_loss(run, batch, 0)  # the same draws (seeded by the micro-step), no class rows
    run.preservation = preservation

    rows, noisy, target, timesteps = seen["returned"]
    kwargs = run.conditioning.unet_kwargs({"prompts": rows["prompts"][ROWS:]}, torch.float32)
    class_pred = run.base.unet(noisy[ROWS:], timesteps[ROWS:], **kwargs, return_dict=False)[0]
    mse = F.mse_loss(class_pred, target[ROWS:])
    assert mse > 1e-4  # the term is not trivially zero
    # Min-SNR (snr_gamma 5) weights the instance rows only; the class rows' MSE enters unweighted.
    torch.testing.assert_close(total, instance + 0.5 * mse, rtol=1e-5, atol=0)

    (total - instance).backward()  # the preservation term alone
    for component, layers in pipeline_adapters(run.base.pipe).items():
        for name, layer in layers.items():
            assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0, f"{component}.{name}"


def test_scales_come_back_when_the_forward_raises(tiny_sd15_dir, tmp_path):
    run = _set_up_run(tiny_sd15_dir, tmp_path, train_text_encoder=True)
    layers = run.preservation.layers
    layers[0].set_scale(0.5)
    with pytest.raises(RuntimeError, match="boom"), adapters_off(layers):
        assert {layer.scale for layer in layers} == {0.0}
        raise RuntimeError("boom")
    assert [layer.scale for layer in layers] == [0.5] + [1.0] * (len(layers) - 1)


def test_run_writes_no_class_images_and_resumes_bit_for_bit(tiny_sd15_dir, tmp_path, capsys):
    photos = make_photos(tmp_path / "photos", count=2)
    class_dir = tmp_path / "class"
    settings = dict(with_prior_preservation=True, prior_source="base_model", class_prompt=CLASS_PROMPT,
                    class_data_dir=str(class_dir), learning_rate=1e-3, checkpointing_steps=2, train_text_encoder=True)
    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "a", max_train_steps=4, **settings))
    report = capsys.readouterr().out
    assert (f"Prior preservation: the base model's own predictions for {CLASS_PROMPT!r} on the same noisy latents as "
            f"the photos (no class images; --class_data_dir {class_dir} ignored)") in report
    assert not class_dir.exists()
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"yes ({CLASS_PROMPT!r}, weight 1.0, the base model's own predictions, no class images)" in card

    run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", max_train_steps=2, **settings))
    resumed = run_training(tiny_config(tiny_sd15_dir, photos, tmp_path / "b", max_train_steps=4,
                                       resume_from_checkpoint="latest", **settings))
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("moslora_B"))


def test_gate_trainer_refuses_the_base_model_source():
    from moslora_diffusion.mole.gate_config import GateTrainConfig
    from moslora_diffusion.training.settings.flags import ConfigError

    with pytest.raises(ConfigError, match="--prior_source base_model is for DreamBooth runs"):
        GateTrainConfig(pretrained_model_name_or_path="m", experts=("a", "b"), with_prior_preservation=True,
                        class_prompt="a photo of a dog", class_data_dir="c", prior_source="base_model")


def test_the_default_source_is_class_images_with_a_class_folder_else_the_base_model(tmp_path):
    """--prior_source auto (the default): a diffusers-style command with --class_data_dir keeps its class images;
    without one the run preserves the base model's own predictions (what the toy world's validation split chose)
    instead of stopping for the missing folder."""
    common = dict(with_prior_preservation=True, class_prompt="a photo of a dog")
    photos = tmp_path / "photos"  # the class folder beside the photos, not in them (refused: they would mix)
    with_folder = tiny_config(tmp_path, photos, tmp_path / "o", class_data_dir=str(tmp_path / "c"), **common)
    without = tiny_config(tmp_path, tmp_path, tmp_path / "o", **common)
    assert with_folder.prior_source == without.prior_source == "auto"
    assert (with_folder.resolved_prior_source, without.resolved_prior_source) == ("class_images", "base_model")
    assert uses_class_images(with_folder) and not preserves_base_output(with_folder)
    assert preserves_base_output(without) and not uses_class_images(without)
    explicit = tiny_config(tmp_path, photos, tmp_path / "o", class_data_dir=str(tmp_path / "c"),
                           prior_source="base_model", **common)
    assert preserves_base_output(explicit)  # an explicit source wins over the folder
    assert not preserves_base_output(tiny_config(tmp_path, tmp_path, tmp_path / "o"))  # no prior preservation


def test_with_pivotal_tuning_the_target_uses_the_trigger_words_original_rows(tiny_sd15_dir, tmp_path):
    """A caption may name the trigger word outside the instance prompt ("..., sks style"): its preservation prompt
    keeps the word, and the target must still be the base model's, not the learned vectors'."""
    from moslora_diffusion.moslora.token_vectors import pipeline_token_vectors

    run = _set_up_run(tiny_sd15_dir, tmp_path, False, f"{PROMPT}, sks style", train_text_encoder_ti=True,
                      token_abstraction="sks")
    base = run.base
    vectors = pipeline_token_vectors(base.pipe)
    with torch.no_grad():
        for module in vectors.values():
            module.vectors.add_(torch.randn_like(module.vectors))  # learned vectors far from the original rows
    prompt = run.preservation.prompts([f"{PROMPT}, sks style"])[0]
    assert prompt == f"{CLASS_PROMPT}, sks style"
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((1, 4, 4, 4), generator=generator)
    timesteps = torch.tensor([500])
    target = run.preservation.base_prediction({"prompts": [prompt]}, noisy, timesteps)
    assert pipeline_token_vectors(base.pipe) == vectors  # the vectors are back after the switch
    expected = _prediction_without_adapters(tiny_sd15_dir, base.family, [prompt], noisy, timesteps, {})
    assert torch.equal(target, expected)
    with torch.no_grad():  # and they do act outside it: the word's adapted encoding differs
        adapted = run.conditioning.unet_kwargs({"prompts": [prompt]}, torch.float32)["encoder_hidden_states"]
        original = run.preservation.base_conditioning.unet_kwargs({"prompts": [prompt]}, torch.float32)
    assert (adapted - original["encoder_hidden_states"]).abs().max() > 1e-3
