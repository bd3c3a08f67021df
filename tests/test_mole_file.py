"""The MoLE file: self-contained (gates + experts), round-trips exactly, and refuses other experts or families."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from mole_helpers import forward, make_experts, same_state, state
from safetensors import safe_open

from moslora_diffusion.mole import FILE_NAME, MoLEError, attach_mole, detach_mole, load_experts, load_mole, save_mole

PROMPTS = ["a photo of sks dog"]


@pytest.fixture(scope="module")
def dirs(tiny_sd15_dir, tmp_path_factory):
    return make_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"))


@torch.no_grad()
def _trained_like(mole):
    g = torch.Generator().manual_seed(3)
    for gate in mole.gates:
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
        gate.log_temperature.fill_(-0.3)


def test_mole_file_round_trips_without_the_expert_files(tiny_sd15_dir, dirs, tmp_path):
    copies = {name: shutil.copytree(folder, tmp_path / "experts" / name) for name, folder in dirs.items()}
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, list(copies.values())))
    _trained_like(mole)
    mole.set_scales({"cat": 0.7})
    text, out = forward(pipe, PROMPTS)
    path = save_mole(mole, tmp_path / "run" / FILE_NAME, base_model="tiny-sd15", settings={"balance_weight": 0.5})
    shutil.rmtree(tmp_path / "experts")  # self-contained: the experts' own files are not needed any more
    fresh = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    loaded = load_mole(fresh, path)
    again_text, again = forward(fresh, PROMPTS)
    assert torch.equal(again, out) and torch.equal(again_text, text)  # same fp32 factors and gates: bit for bit
    assert loaded.expert_names == ["dog", "cat", "style"] and loaded.scales.tolist() == pytest.approx([1.0, 0.7, 1.0])
    assert [e.sha256 for e in loaded.experts] == [e.sha256 for e in mole.experts]
    with safe_open(str(path), "pt") as f:
        record = json.loads(f.metadata()["mole"])
    assert record["family"] == "sd1" and record["base_model"] == "tiny-sd15" and record["format_version"] == 1
    assert record["settings"]["balance_weight"] == 0.5 and "LayerNorm" in record["settings"]["gate_features"]
    dog = record["experts"][0]
    assert (dog["name"], dog["source"], dog["trigger_prompt"], dog["rank"]) == ("dog", "dog", "a photo of sks dog", 4)
    assert dog["layers"] == len(mole.experts[0].layers) and len(dog["sha256"]) == 64
    assert record["blocks"] == [b.name for b in mole.blocks]


def test_mole_file_is_refused_for_other_experts_and_other_families(tiny_sd15_dir, tiny_sdxl_dir, dirs, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    experts = load_experts(pipe, list(dirs.values()))
    three = attach_mole(pipe, experts)
    path = save_mole(three, tmp_path / FILE_NAME)
    fresh = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    before = state(fresh)
    two = load_experts(fresh, [dirs["dog"], dirs["cat"]])
    with pytest.raises(MoLEError, match=r"its gates were trained for experts dog \(\w+\), cat \(\w+\), style"):
        load_mole(fresh, path, experts=two)
    renamed = load_experts(fresh, list(dirs.values()), names=["dog", "cat", "painting"])
    with pytest.raises(MoLEError, match="not dog .*, cat .*, painting"):
        load_mole(fresh, path, experts=renamed)
    with pytest.raises(MoLEError, match="MoLE trained for sd1, but the pipeline is sdxl"):
        load_mole(DiffusionPipeline.from_pretrained(tiny_sdxl_dir), path)
    with pytest.raises(MoLEError, match="not a MoLE file"):
        load_mole(fresh, dirs["dog"] / "moslora.safetensors")
    with pytest.raises(MoLEError, match=r"has shape \(3, 64\), this model needs \(2, 64\) \(gates trained for other"):
        attach_mole(fresh, two, gates=three.gate_state())
    assert same_state(state(fresh), before)
    assert load_mole(fresh, path, experts=load_experts(fresh, list(dirs.values()))).expert_names == list(dirs)


def test_the_class_prompt_a_file_records_reaches_the_expert_and_the_mole_file(tiny_sd15_dir, tmp_path):
    """auto's trigger words leave the class prompt's words out: the class prompt has to travel from the LoRA's
    header to the Expert, to the headers-only check of the commands, and through a MoLE file."""
    from conftest import make_adapter

    from moslora_diffusion.files.safetensors_io import load_tensors, save_tensors
    from moslora_diffusion.mole.experts import expert_prompts
    from moslora_diffusion.mole.file import read_mole

    paths = []
    for name, prompt in (("dog", "a photo of sks dog"), ("cat", "a photo of zwx cat")):
        path = make_adapter(tiny_sd15_dir, tmp_path / name / "moslora.safetensors", seed=len(paths) + 1)
        tensors, metadata = load_tensors(path)
        record = json.loads(metadata["moslora"]) | {"instance_prompt": prompt, "class_prompt": prompt.replace(
            "sks ", "a ").replace("zwx ", "a ")}
        save_tensors(tensors, path, metadata | {"moslora": json.dumps(record)})
        paths.append(path)
    assert expert_prompts(paths) == {"dog": ("a photo of sks dog", "a photo of a dog"),
                                     "cat": ("a photo of zwx cat", "a photo of a cat")}
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    experts = load_experts(pipe, paths)
    assert [e.class_prompt for e in experts] == ["a photo of a dog", "a photo of a cat"]
    attach_mole(pipe, experts)
    mole = save_mole(detach_mole(pipe), tmp_path / "mole.safetensors")
    assert [e.class_prompt for e in read_mole(mole).experts] == ["a photo of a dog", "a photo of a cat"]
