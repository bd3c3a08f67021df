"""`python -m moslora_diffusion.generate`: images with reproducible parameters, clear errors."""

import pytest
from conftest import make_adapter
from PIL import Image

from moslora_diffusion.generate import main


def test_generates_each_prompt_and_seed_with_parameters(tiny_sd15_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors", seed=1)
    out = tmp_path / "samples"
    main(["--base", str(tiny_sd15_dir), "--adapter", f"{adapter.parent}:0.5", "--prompt", "a photo of sks dog",
          "--prompt", "a photo of sks dog on grass", "--seeds", "3", "4", "--steps", "2", "--compare_with_base",
          "--out", str(out)])
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 2 * 2 * 2  # prompts x seeds x (base, adapted)
    texts = [Image.open(p).info["parameters"] for p in pngs]
    assert sum("Lora scales: run: 0.5" in t for t in texts) == 4 and sum("Lora scales: run: 0" in t for t in texts) == 8
    assert all("Steps: 2" in t for t in texts) and any("Seed: 4" in t for t in texts)
    # only images: the app's empty training/ and mole/ job folders were once made in --out too
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    # the last line names the folder the images are in (<out>/images/<date>/), not only --out
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote 8 images in {pngs[0].parent}"


def test_adapter_of_another_family_is_a_clear_error(tiny_sd15_dir, tiny_sdxl_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_sd15_dir, tmp_path / "sd1.safetensors", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--base", str(tiny_sdxl_dir), "--adapter", str(adapter), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "trained for sd1, but the model is sdxl" in capsys.readouterr().err
    assert not list((tmp_path / "o").rglob("*.png"))


@pytest.mark.parametrize("adapter, message", [
    ("text.safetensors", "is not a valid safetensors file (damaged or truncated?)"),
    ("photos", "no adapter file there (expected moslora.safetensors or a .safetensors)"),
])
def test_a_bad_adapter_is_named_before_the_model_loads_and_nothing_is_made(tmp_path, capsys, adapter, message):
    """A damaged adapter or a folder without one was found only after the model loaded, and --out was left
    behind, empty. The base model here does not exist: the adapter's error must come first."""
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    (tmp_path / "photos").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--base", str(tmp_path / "no-model"), "--adapter", str(tmp_path / adapter), "--prompt", "p",
              "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_one_image_is_one_image(tiny_sd15_dir, tmp_path, capsys):
    """It printed "wrote 1 images"."""
    main(["--base", str(tiny_sd15_dir), "--prompt", "a photo of sks dog", "--seeds", "3", "--steps", "1",
          "--size", "64", "--out", str(tmp_path / "samples")])
    (png,) = (tmp_path / "samples").rglob("*.png")
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote 1 image in {png.parent}"
