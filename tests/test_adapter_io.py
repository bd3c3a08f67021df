"""The native adapter file: exact round trip, the authors' `lora_AB` naming, and bad input."""

import pytest
import torch
from conftest import generate, randomize_adapters
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from moslora_diffusion import AdapterConfig, AdapterError, attach_to_pipeline, load_adapter, save_adapter
from moslora_diffusion.files.safetensors_io import WeightFileError, read_metadata
from moslora_diffusion.moslora.pipeline import pipeline_adapters


@pytest.fixture(scope="module")
def saved_sd15(tiny_sd15_dir, tmp_path_factory):
    """An SD 1.x adapter (UNet + text encoder, non-zero B, kaiming mixer) saved once, and its images."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    torch.manual_seed(0)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8, mixer_init="orthogonal"), text_targets="attn")
    randomize_adapters(pipe)
    path = save_adapter(pipe, tmp_path_factory.mktemp("adapter") / "moslora.safetensors",
                        info={"base_model": str(tiny_sd15_dir), "instance_prompt": "a photo of sks dog"})
    return path, {0.5: _at_scale(pipe, 0.5), 1.0: _at_scale(pipe, 1.0)}


def _at_scale(pipe, scale):
    from moslora_diffusion import set_pipeline_scale

    set_pipeline_scale(pipe, scale)
    return generate(pipe)


def _fresh(model_dir):
    return DiffusionPipeline.from_pretrained(model_dir)


def test_round_trip_is_exact_and_metadata_complete(saved_sd15, tiny_sd15_dir):
    path, images = saved_sd15
    pipe = _fresh(tiny_sd15_dir)
    adapter = load_adapter(pipe, path, scale=0.5)
    assert (generate(pipe) == images[0.5]).all()
    meta = adapter.info
    assert meta["family"] == "sd1" and meta["format_version"] == 1 and meta["base_model"] == str(tiny_sd15_dir)
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert meta["config"] == {"kind": "moslora", "rank": 4, "alpha": 8, "mixer_init": "orthogonal", "dropout": 0.0}
    assert set(meta["targets"]) == {"unet", "text_encoder"}
    # text encoder modules use the classic CLIP names whatever the transformers version
    assert all(m.startswith("text_model.encoder.layers.") for m in meta["targets"]["text_encoder"])


def test_authors_lora_ab_naming_is_read(saved_sd15, tiny_sd15_dir, tmp_path):
    """The authors' release stores PEFT-style keys with the mixer as `lora_AB`; same adapter, same images."""
    path, images = saved_sd15
    native = load_file(path)
    renamed = {}
    for key, value in native.items():
        stem, part = key.rsplit(".moslora_", 1)
        suffix = {"A": "lora_A.weight", "M": "lora_AB.weight", "B": "lora_B.weight"}[part]
        renamed[f"{stem}.{suffix}"] = value
    authors = tmp_path / "authors.safetensors"
    save_file(renamed, str(authors), metadata={"moslora": read_metadata(path)["moslora"]})
    pipe = _fresh(tiny_sd15_dir)
    load_adapter(pipe, authors, scale=1.0)
    assert (generate(pipe) == images[1.0]).all()


def _assert_untouched(pipe, tiny_dir):
    assert not pipeline_adapters(pipe)
    reference = _fresh(tiny_dir).unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in pipe.unet.state_dict().items())


def test_adapter_for_another_family_is_refused(saved_sd15, tiny_sdxl_dir):
    pipe = _fresh(tiny_sdxl_dir)
    with pytest.raises(AdapterError, match="trained for sd1, but the model is sdxl"):
        load_adapter(pipe, saved_sd15[0])
    _assert_untouched(pipe, tiny_sdxl_dir)


def test_shape_mismatch_names_the_first_module(saved_sd15, tiny_sdxl_dir, tmp_path):
    """Without family metadata the shape check still catches it, naming the module."""
    tensors = load_file(saved_sd15[0])
    # the mid block exists in both tiny models; its cross-attention keys differ (32 vs 64 wide context)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("unet.mid_block.")}
    bare = tmp_path / "bare.safetensors"
    save_file(unet_only, str(bare))
    pipe = _fresh(tiny_sdxl_dir)
    with pytest.warns(UserWarning, match="no moslora metadata"):
        first_mismatch = r"shape mismatch at unet\.mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"
        with pytest.raises(AdapterError, match=first_mismatch):
            load_adapter(pipe, bare)
    _assert_untouched(pipe, tiny_sdxl_dir)


def test_missing_keys_are_refused(saved_sd15, tiny_sd15_dir, tmp_path):
    tensors = load_file(saved_sd15[0])
    dropped = next(k for k in tensors if k.endswith(".moslora_B"))
    del tensors[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    pipe = _fresh(tiny_sd15_dir)
    with pytest.raises(AdapterError, match="missing its B weights"):
        load_adapter(pipe, broken)
    _assert_untouched(pipe, tiny_sd15_dir)


def test_unknown_module_is_refused(saved_sd15, tiny_sd15_dir, tmp_path):
    tensors = {k.replace("unet.down_blocks.0.", "unet.down_blocks.7."): v for k, v in load_file(saved_sd15[0]).items()}
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    pipe = _fresh(tiny_sd15_dir)
    with pytest.raises(AdapterError, match="down_blocks.7.* does not exist in this model"):
        load_adapter(pipe, odd)
    _assert_untouched(pipe, tiny_sd15_dir)


@pytest.mark.parametrize("case", ["not_safetensors", "truncated", "pickle_suffix", "missing"])
def test_damaged_or_foreign_files_are_refused(saved_sd15, tiny_sd15_dir, tmp_path, case):
    bad = tmp_path / "bad.safetensors"
    if case == "not_safetensors":
        bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
        expected = "not a valid safetensors file"
    elif case == "truncated":
        data = saved_sd15[0].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = "not a valid safetensors file"
    elif case == "pickle_suffix":
        bad = tmp_path / "adapter.bin"
        bad.write_bytes(b"\x80\x04K\x01.")
        expected = "only .safetensors files are accepted"
    else:
        bad = tmp_path / "nothing.safetensors"
        expected = "no such file"
    pipe = _fresh(tiny_sd15_dir)
    with pytest.raises(WeightFileError, match=expected):
        load_adapter(pipe, bad)
    _assert_untouched(pipe, tiny_sd15_dir)


def test_saving_is_atomic_and_refuses_an_empty_pipeline(tiny_sd15_dir, tmp_path):
    pipe = _fresh(tiny_sd15_dir)
    with pytest.raises(AdapterError, match="no MoSLoRA adapters to save"):
        save_adapter(pipe, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
