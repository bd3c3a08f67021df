"""No file we write holds NaN or inf: the one safetensors writer refuses them (adapters, LoRA exports, single-file
checkpoints, training checkpoints), and so does the merged diffusers folder. Nothing is left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter, randomize_adapters

from moslora_diffusion import AdapterConfig, attach_to_pipeline, fold_pipeline, pipeline_adapters, save_adapter
from moslora_diffusion.files.safetensors_io import NonFiniteError, load_tensors, save_tensors
from moslora_diffusion.formats.export_targets import export
from moslora_diffusion.formats.lora import save_diffusers_lora, save_kohya_lora
from moslora_diffusion.models.families import detect_family
from moslora_diffusion.models.loading import load_pipeline


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_safetensors_writer_refuses_non_finite_tensors_and_writes_nothing(tmp_path, bad, dtype):
    (tmp_path / "keep.txt").write_text("mine")
    tensors = {"ok": torch.ones(3, dtype=dtype), "steps": torch.arange(3), "bad": torch.tensor([1.0, bad]).to(dtype)}
    with pytest.raises(NonFiniteError, match="out.safetensors: bad holds NaN or inf values"):
        save_tensors(tensors, tmp_path / "out.safetensors")
    assert _listing(tmp_path) == ["keep.txt"]  # no file, no hidden temporary file
    del tensors["bad"]
    save_tensors(tensors, tmp_path / "out.safetensors")  # integer tensors and finite floats pass
    assert torch.equal(load_tensors(tmp_path / "out.safetensors")[0]["steps"], torch.arange(3))


@pytest.fixture
def diverged_pipe(tiny_sd15_dir):
    """A pipeline whose adapters learned something (B != 0), one B entry NaN as after a diverged run."""
    pipe = load_pipeline(tiny_sd15_dir)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8), text_targets="attn")
    randomize_adapters(pipe)
    layer = next(iter(pipeline_adapters(pipe)["unet"].values()))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    return pipe


def test_no_adapter_or_lora_export_of_a_diverged_run_is_written(diverged_pipe, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NonFiniteError, match="moslora_B holds NaN or inf values"):
        save_adapter(diverged_pipe, tmp_path / "moslora.safetensors")
    folded = fold_pipeline(diverged_pipe)
    with pytest.raises(NonFiniteError, match="lora_B.weight holds NaN"):
        save_diffusers_lora(folded, tmp_path)
    with pytest.raises(NonFiniteError, match="lora_up.weight holds NaN"):
        save_kohya_lora(folded, tmp_path / "kohya.safetensors", detect_family(diverged_pipe),
                        dict(diverged_pipe.unet.config))
    assert _listing(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("target, out_name", [("merged-single-file", "merged.safetensors"),
                                              ("merged-diffusers", "merged")])
def test_a_merge_that_overflows_fp16_is_refused(tiny_sd15_dir, tmp_path, target, out_name):
    """A finite adapter whose delta exceeds fp16's 65504: merged in fp16 the weights would be inf (black images in
    every UI). The export stops instead, and writes nothing; in fp32 the same merge is fine."""
    adapter = make_adapter(tiny_sd15_dir, tmp_path / "big" / "moslora.safetensors", std=1e8)
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(NonFiniteError, match="too large for the chosen dtype"):
        export(tiny_sd15_dir, [(adapter, 1.0)], target, exports / out_name, dtype="fp16")
    assert _listing(exports) == []
    written = export(tiny_sd15_dir, [(adapter, 1.0)], target, exports / out_name, dtype="fp32")
    assert written.exists()
