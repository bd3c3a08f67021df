"""MoLE experts: native, diffusers and kohya LoRA files fold to the same deltas; bad inputs are refused with one
line before the pipeline is touched."""

import dataclasses
import json

import pytest
import torch
from conftest import make_adapter
from diffusers import DiffusionPipeline
from mole_helpers import make_experts, same_state, state
from safetensors.torch import save_file

from moslora_diffusion import load_adapter
from moslora_diffusion.formats.lora import export_pipeline_loras, fold_pipeline, kohya_state_dict
from moslora_diffusion.models.families import SD1
from moslora_diffusion.mole import MoLEError, attach_mole, load_experts
from moslora_diffusion.mole.model import ATTRIBUTE

DELTA_ATOL = 1e-6  # fp32 factors, one matmul; observed ~1e-7 on deltas of magnitude ~1


@pytest.fixture(scope="module")
def sd15_experts(tiny_sd15_dir, tmp_path_factory):
    return make_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"), names=("dog", "cat"))


def _exports(model_dir, native, folder):
    """The native adapter written by the project's own exporters: diffusers folder and kohya file."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    load_adapter(pipe, native)
    written = export_pipeline_loras(pipe, diffusers_folder=folder / "diffusers",
                                    kohya_path=folder / "kohya.safetensors", info={"instance_prompt": "a sks dog"})
    return pipe, written


def _deltas(expert):
    return {key: lora.up @ lora.down for key, lora in expert.layers.items()}


def _assert_same_deltas(expert, reference):
    ours, theirs = _deltas(expert), _deltas(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() <= DELTA_ATOL, key
    assert max(d.abs().max() for d in theirs.values()) > 0.1  # non-zero experts


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_and_diffusers_files_load_as_experts_with_the_native_fold(family, tiny_dirs, tmp_path):
    native = make_adapter(tiny_dirs[family], tmp_path / "dog" / "moslora.safetensors", seed=4, rank=4, alpha=8,
                          unet_targets="attn+proj", text_targets="attn")
    _, written = _exports(tiny_dirs[family], native, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    reference, from_diffusers = load_experts(pipe, [native.parent, written["diffusers"].parent])
    _, from_kohya = load_experts(pipe, [native, written["kohya"]])
    assert (reference.source_format, from_diffusers.source_format, from_kohya.source_format) == (
        "moslora", "diffusers", "kohya")
    # The native fold, checked independently: delta = (alpha / r) * B M A of the trained layer.
    block = "down_blocks.1.attentions.0" if family == "sdxl" else "down_blocks.0.attentions.0"
    key = ("unet", f"{block}.transformer_blocks.0.attn1.to_q")
    adapted = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    load_adapter(adapted, native)
    layer = adapted.unet.get_submodule(key[1])
    assert torch.allclose(reference.layers[key].up @ reference.layers[key].down, layer.delta_weight(), atol=DELTA_ATOL)
    for expert in (from_diffusers, from_kohya):
        _assert_same_deltas(expert, reference)
        assert expert.trigger_prompt == "a sks dog"  # read back from the export's metadata
    assert from_kohya.family == ("sdxl" if family == "sdxl" else "sd1")  # ss_base_model_version
    assert {c for c, _ in reference.layers} == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                                 else {"unet", "text_encoder"})


def test_kohya_names_are_inverted_for_both_unet_namings_and_peft_alpha_is_read(tiny_sd15_dir, sd15_experts, tmp_path):
    """An SD 1.x kohya file with LDM-style UNet names (input_blocks_1_1_...) maps back as well; a diffusers file
    storing unbaked factors with PEFT's lora_alpha / r in `lora_adapter_metadata` gets the same delta."""
    native = sd15_experts["dog"] / "moslora.safetensors"
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    load_adapter(pipe, native)
    folded = fold_pipeline(pipe)
    ldm = kohya_state_dict(folded, dataclasses.replace(SD1, kohya_unet_naming="ldm"), dict(pipe.unet.config))
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in ldm)
    save_file(ldm, tmp_path / "ldm.safetensors")
    peft = {}
    for component, modules in folded.items():
        for module, lora in modules.items():
            peft[f"{component}.{module}.lora_A.weight"] = lora.down
            peft[f"{component}.{module}.lora_B.weight"] = lora.up  # alpha / r = 2 not baked in
    config = {f"{c}.{k}": v for c in folded for k, v in (("lora_alpha", 8), ("r", 4))}
    save_file(peft, tmp_path / "peft.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    fresh = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    reference, from_ldm, from_peft = load_experts(fresh, [native, tmp_path / "ldm.safetensors",
                                                          tmp_path / "peft.safetensors"])
    _assert_same_deltas(from_ldm, reference)
    _assert_same_deltas(from_peft, reference)


def test_expert_records_trigger_prompt_photo_folder_and_hash(tiny_sd15_dir, sd15_experts, tmp_path):
    # As a training run records it: the flag as typed, and the folder resolved when the run started.
    (sd15_experts["dog"] / "training_config.json").write_text(json.dumps({
        "moslora_diffusion_version": "0.1.0",
        "config": {"instance_data_dir": "dog", "instance_prompt": "a photo of sks dog"},
        "inputs": {"instance_data_dir": {"path": "/photos/dog", "files": None}}}))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    dog, cat = load_experts(pipe, [sd15_experts["dog"], sd15_experts["cat"]], scales=[1.0, 0.5])
    assert (dog.name, cat.name) == ("dog", "cat")  # a training folder's name
    assert dog.trigger_prompt == "a photo of sks dog" and dog.photo_dir == "/photos/dog"
    assert cat.photo_dir is None and cat.scale == 0.5
    assert len(dog.sha256) == 64 and dog.sha256 != cat.sha256
    assert all(lora.alpha == lora.rank for lora in dog.layers.values())  # alpha / r baked: delta = up @ down


def _one_line(err) -> bool:
    return "\n" not in str(err.value) and len(str(err.value)) < 300


def test_bad_experts_are_refused_with_one_line_before_anything_is_touched(tiny_sd15_dir, tiny_sdxl_dir,
                                                                          sd15_experts, tmp_path):
    dog, cat = sd15_experts["dog"], sd15_experts["cat"]
    xl = make_adapter(tiny_sdxl_dir, tmp_path / "xl" / "moslora.safetensors", seed=5)
    (tmp_path / "dog.bin").write_bytes(b"not really a pickle")
    save_file({"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32),
               "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2)},
              tmp_path / "stray.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_no_such_layer.lora_down.weight": torch.ones(2, 32),
               "lora_unet_down_blocks_0_attentions_0_no_such_layer.lora_up.weight": torch.ones(32, 2)},
              tmp_path / "stray_kohya.safetensors")
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 7),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2)},
              tmp_path / "shape.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(2, 32)},
              tmp_path / "loha.safetensors")
    save_file({"weight": torch.ones(2)}, tmp_path / "other.safetensors")
    cases = [
        ([dog, xl], "experts of different families: dog is sd1, xl is sdxl"),
        ([dog], "2 to 8 experts; got 1"),
        ([dog] * 9, "2 to 8 experts; got 9"),
        ([dog, tmp_path / "dog.bin"], "pickle"),
        ([dog, tmp_path / "missing.safetensors"], "not found"),
        ([dog, tmp_path / "stray.safetensors"], "down_blocks.7.attentions.0.proj_in matches no module"),
        ([dog, tmp_path / "stray_kohya.safetensors"], "no_such_layer matches no adaptable module"),
        ([dog, tmp_path / "shape.safetensors"], "shape mismatch"),
        ([dog, tmp_path / "loha.safetensors"], "not a plain LoRA"),
        ([dog, tmp_path / "other.safetensors"], "not a LoRA file"),
        ([dog, dog / "moslora.safetensors"], "given twice"),
        ([dog, cat, cat.parent], "holds neither"),
    ]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    before = state(pipe)
    for paths, message in cases:
        with pytest.raises(MoLEError, match=message) as err:
            load_experts(pipe, paths)
        assert _one_line(err), str(err.value)
    with pytest.raises(MoLEError, match="2 experts but 1 scales"):
        load_experts(pipe, [dog, cat], scales=[1.0])
    with pytest.raises(MoLEError, match="finite"):
        load_experts(pipe, [dog, cat], scales=[1.0, float("nan")])
    assert same_state(state(pipe), before) and not hasattr(pipe, ATTRIBUTE)
    xl_pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    with pytest.raises(MoLEError, match="the experts are for sd1 but the pipeline is sdxl"):
        load_experts(xl_pipe, [dog, cat])


def test_attach_refuses_a_second_mole_moslora_adapters_and_fused_projections(tiny_sd15_dir, sd15_experts):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    experts = load_experts(pipe, list(sd15_experts.values()))
    attach_mole(pipe, experts)
    with pytest.raises(MoLEError, match="already has MoLE attached"):
        attach_mole(pipe, experts)
    other = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    load_adapter(other, sd15_experts["dog"] / "moslora.safetensors")
    with pytest.raises(MoLEError, match="MoSLoRA adapters attached"):
        attach_mole(other, experts)
    fused = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    fused.fuse_qkv_projections()  # to_q / to_k / to_v would never run: their experts would silently vanish
    with pytest.raises(MoLEError, match="unfuse_qkv_projections"):
        attach_mole(fused, experts)


def test_the_prompts_an_export_of_one_adapter_records_are_read():
    """`python -m moslora_diffusion.export` records each adapter's prompts under `adapters`: auto said such a LoRA
    records no training prompt. A merge of two adapters has no one prompt."""
    import json

    from moslora_diffusion.formats.lora_files import trigger_prompt

    one = {"moslora_export": json.dumps({"adapters": [{"name": "star", "instance_prompt": "a photo of sks star",
                                                       "class_prompt": "a photo of a star"}]})}
    assert trigger_prompt(one) == "a photo of sks star"
    assert trigger_prompt(one, "class_prompt") == "a photo of a star"
    two = {"moslora_export": json.dumps({"adapters": [{"instance_prompt": "a"}, {"instance_prompt": "b"}]})}
    assert trigger_prompt(two) is None and trigger_prompt({"moslora_export": "not json"}) is None
