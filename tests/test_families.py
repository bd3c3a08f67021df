"""Family detection from pipelines, folders and single files; unsupported families are refused clearly."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from moslora_diffusion import SD1, SD2, SDXL, UnsupportedModelError, detect_model
from moslora_diffusion.files.safetensors_io import WeightFileError
from moslora_diffusion.models.loading import family_of_single_file, load_pipeline


def test_detects_each_family_from_folder_and_pipeline(tiny_sd15_dir, tiny_sdxl_dir, tiny_sd2_dir):
    for folder, family, prediction in ((tiny_sd15_dir, SD1, "epsilon"), (tiny_sdxl_dir, SDXL, "epsilon"),
                                       (tiny_sd2_dir, SD2, "v_prediction")):
        from_folder = detect_model(folder)
        assert from_folder.family is family and from_folder.prediction_type == prediction
        assert detect_model(DiffusionPipeline.from_pretrained(folder)) == from_folder
    assert detect_model(tiny_sd2_dir).default_resolution == 768  # v-prediction SD 2.x is the 768 px model
    assert detect_model(tiny_sd15_dir).default_resolution == 512


@pytest.mark.parametrize("pipeline_class", ["StableDiffusion3Pipeline", "FluxPipeline", "KandinskyPipeline"])
def test_other_families_are_unsupported(tmp_path, pipeline_class):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(UnsupportedModelError, match=f"unsupported model family: {pipeline_class}"):
        detect_model(tmp_path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no model_index.json"):
        detect_model(tmp_path)


@pytest.mark.parametrize("marker, name", [
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ("cond_stage_model.model.ln_final.weight", "sd2"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
])
def test_single_file_family_from_its_keys(tmp_path, marker, name):
    path = tmp_path / "model.safetensors"
    save_file({marker: torch.zeros(2), "model.diffusion_model.out.2.bias": torch.zeros(2)}, str(path))
    assert family_of_single_file(path).name == name


def test_single_file_of_another_family_is_unsupported(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UnsupportedModelError, match="unsupported model family"):
        load_pipeline(path)


def test_load_pipeline_refuses_pickles_and_missing_paths(tmp_path):
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04.")
    with pytest.raises(WeightFileError, match="pickle"):
        load_pipeline(pickle_file)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pipeline(tmp_path / "does-not-exist")


def test_load_pipeline_from_a_local_folder(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, torch_dtype=torch.bfloat16)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.unet.dtype == torch.bfloat16


def test_tiny_command_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "moslora_diffusion.tiny", "--family", "sd15", "--out", str(out)],
                   check=True, capture_output=True)
    assert detect_model(out).family is SD1
    again = subprocess.run([sys.executable, "-m", "moslora_diffusion.tiny", "--family", "sd15", "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_an_adapter_given_as_the_base_model_is_named_as_such(tiny_sd15_dir, tmp_path):
    """A user who passes their trained adapter where the base model goes is told so, from the tensor names."""
    from conftest import make_adapter

    adapter = make_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors")
    with pytest.raises(UnsupportedModelError, match="is an adapter .* not a base model"):
        family_of_single_file(adapter)
