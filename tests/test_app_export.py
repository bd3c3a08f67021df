"""The Export tab's function: kohya LoRA and merged single file for the loaded adapters at their scales."""

import json

import pytest
import torch
from app_helpers import tiny_app_state
from conftest import make_adapter

from moslora_diffusion.app.exporting import AppExportError, export_adapters
from moslora_diffusion.files.safetensors_io import load_tensors


@pytest.fixture(scope="module")
def state(tiny_sd15_dir, tmp_path_factory):
    app, given = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    app.load_adapter(make_adapter(tiny_sd15_dir, given / "dog" / "moslora.safetensors", seed=1, alpha=8))
    app.load_adapter(make_adapter(tiny_sd15_dir, given / "style.safetensors", seed=2, rank=2, alpha=2,
                                  text_targets=None))
    return app


def test_kohya_export_holds_each_chosen_adapter_at_its_scale(state):
    path = export_adapters(state, "lora-kohya", {"dog": 0.5, "style": 0.0}, "fp32")
    assert path.parent.parent == state.outputs / "exports" and path.name.endswith("-dog-lora-kohya.safetensors")
    tensors, _ = load_tensors(path)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    down_keys = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert {tensors[k].shape[0] for k in down_keys} == {4}  # the style adapter (rank 2, scale 0) is left out
    alpha = next(v for k, v in tensors.items() if k.endswith(".alpha"))
    assert float(alpha) == 8.0  # the real alpha, not alpha = rank
    # The fold at scale 0.5: (alpha / r) * up @ down equals 0.5 * the adapter's own delta.
    fused = state.fusion.adapters["dog"]
    key = next(k for k in fused.layers if k[0] == "unet")
    prefix = "lora_unet_" + key[1].replace(".", "_")
    lora = tensors[f"{prefix}.lora_up.weight"] @ tensors[f"{prefix}.lora_down.weight"] * (8.0 / 4)
    assert torch.allclose(lora, 0.5 * fused.delta(key), atol=1e-6)


def test_merged_single_file_export(state):
    path = export_adapters(state, "merged-single-file", {"dog": 1.0, "style": -0.5}, "fp16")
    tensors, meta = load_tensors(path)
    assert any(k.startswith("model.diffusion_model.") for k in tensors)
    assert any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    record = json.loads(meta["moslora_merge"])
    assert [(a["name"], a["scale"]) for a in record["adapters"]] == [("dog", 1.0), ("style.safetensors", -0.5)]


def test_nothing_to_export_is_refused(state):
    with pytest.raises(AppExportError, match="at least one adapter"):
        export_adapters(state, "lora-kohya", {"dog": 0.0, "style": 0.0})
    with pytest.raises(AppExportError, match="no adapter loaded named cat"):
        export_adapters(state, "lora-kohya", {"cat": 1.0})
    with pytest.raises(AppExportError, match="unknown export target"):
        export_adapters(state, "onnx", {"dog": 1.0})


def test_a_pivotal_adapter_downloads_as_one_zip_with_its_embedding(tiny_sd15_dir, tmp_path_factory, monkeypatch):
    """The LoRA alone would not draw the subject: the download is a zip of the LoRA, the trigger word's
    <word>.safetensors and a README.txt saying where each goes; a second export in the same second works too."""
    import zipfile
    from datetime import datetime

    from moslora_diffusion.app import exporting

    class Frozen(datetime):  # every export in the same second
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(exporting, "datetime", Frozen)

    from test_pivotal import WORD, pivotal_adapter

    from moslora_diffusion.app.exporting import export_for_download

    app, given = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    app.load_adapter(pivotal_adapter(tiny_sd15_dir, given / "star" / "moslora.safetensors"))
    first, files = export_for_download(app, "lora-kohya", {"star": 1.0}, "fp32")
    again, _ = export_for_download(app, "lora-kohya", {"star": 1.0}, "fp32")  # never collides with the first
    assert first.suffix == ".zip" and again != first and again.is_file()
    assert (first.name, again.name) == ("20260102-030405-star-lora-kohya.zip", "20260102-030405-star-lora-kohya-2.zip")
    lora = files[0].path
    with zipfile.ZipFile(first) as archive:
        assert sorted(archive.namelist()) == sorted([lora.name, f"{WORD}.safetensors", "README.txt"])
        assert archive.read(lora.name) == lora.read_bytes()
        readme = archive.read("README.txt").decode()
    assert f"- {WORD}.safetensors: the trigger word `{WORD}`'s learned embedding" in readme
    assert "copy into `embeddings/`" in readme and "copy into `models/Lora/`" in readme
    plain, files = export_for_download(app, "merged-single-file", {"star": 1.0}, "fp16")
    assert plain.suffix == ".safetensors" and len(files) == 1  # one file: offered as it is
