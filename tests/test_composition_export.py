"""`mole export --to comfyui-workflow`: the folder (kohya LoRAs that hold each expert's delta, share-map masks, a
workflow that fits ComfyUI's node list, Regional Prompter text); what a workflow cannot express is one line, exit 2,
before the model loads, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from comfyui_check import workflow_problems
from diffusers import DiffusionPipeline
from mole_helpers import make_experts
from PIL import Image

from moslora_diffusion.composition.a1111 import regional_prompter_text
from moslora_diffusion.composition.cli import main
from moslora_diffusion.composition.regions import Region
from moslora_diffusion.formats.lora_files import read_lora_file
from moslora_diffusion.mole import load_experts


@pytest.fixture(scope="module")
def experts(tiny_sd15_dir, tmp_path_factory):
    dirs = make_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"), ("dog", "style"))
    return [str(dirs["dog"]), str(dirs["style"])]


def _export(model, experts, out, *extra):
    return ["export", "--to", "comfyui-workflow", "--base", str(model), "--experts", *experts, "--prompt",
            "a photo of sks dog and a cat", "--negative_prompt", "blurry", "--seeds", "7", "--steps", "3",
            "--size", "64", "--sampler", "DDIM", "--out", str(out), *extra]


def _status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_the_export_folder_reproduces_the_layout(tiny_sd15_dir, experts, tmp_path, capsys):
    out = tmp_path / "dog+style"
    status = main([*_export(tiny_sd15_dir, experts, out, "--region", "dog=0,0,0.75,1", "--region",
                            "style=0.5,0,1,0.5", "--region_prompt", "dog=a photo of sks dog", "--dtype", "fp32",
                            "--scale", "style=0.5")])
    assert status == 0, capsys.readouterr().err
    workflow = json.loads((out / "workflow_api.json").read_text())
    assert workflow_problems(workflow) == []
    names = {v["inputs"]["lora_name"] for v in workflow.values() if v["class_type"] == "CreateHookLora"}
    assert names == {"dog.safetensors", "style.safetensors"}
    strengths = {v["inputs"]["lora_name"]: v["inputs"]["strength_model"] for v in workflow.values()
                 if v["class_type"] == "CreateHookLora"}
    assert strengths == {"dog.safetensors": 1.0, "style.safetensors": 0.5}
    # Each kohya file holds its expert's delta exactly (fp32), read back by the project's own reader.
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    originals = {e.name: e for e in load_experts(pipe, experts)}
    for name, expert in originals.items():
        folded, kind = read_lora_file(out / "loras" / f"{name}.safetensors", pipe, name)
        assert kind == "kohya" and set(folded.layers) == set(expert.layers)
        for key, lora in expert.layers.items():
            assert lora.delta().abs().max() > 0  # non-zero experts: the equality below is not trivial
            torch.testing.assert_close(folded.layers[key].delta(), lora.delta(), rtol=1e-5, atol=1e-6)
    # Masks: the overlap rule's shares (half each where the boxes overlap), the background 1 - sum.
    dog = np.asarray(Image.open(out / "masks" / "dog_style-dog.png"), dtype=np.float32) / 255
    style = np.asarray(Image.open(out / "masks" / "dog_style-style.png"), dtype=np.float32) / 255
    background = np.asarray(Image.open(out / "masks" / "dog_style-background.png"), dtype=np.float32) / 255
    assert dog[:, :32].min() == 1 and dog[40:, :48].min() == 1 and dog[:, 48:].max() == 0
    assert abs(dog[:32, 40] - 0.5).max() < 0.003 and abs(style[:32, 40] - 0.5).max() < 0.003
    assert style[:32, 48:].min() == 1 and style[32:].max() == 0
    assert background[32:, 48:].min() == 1 and background[:32].max() == 0
    text = (out / "a1111-regional-prompter.txt").read_text()
    assert "overlap" in text and "latent" in text and "Forge does not support" in text
    assert (out / "README.txt").is_file() and json.loads((out / "composition.json").read_text())["seed"] == 7


def test_regional_prompter_text_for_halves_and_quarters():
    loras = {"a": ("a", 1.0), "b": ("b", 0.8), "c": ("c", 1.0)}
    halves = regional_prompter_text([Region("a", (0, 0, 0.5, 1), prompt="sks star"), Region("b", (0.5, 0, 1, 1))],
                                    loras, "both", "ugly", 512, 512)
    assert "Divide mode: Horizontal" in halves and "Divide ratio: 256,256" in halves
    assert "sks star <lora:a:1> BREAK\nboth <lora:b:0.8>" in halves and "Generation mode: Latent" in halves
    stacked = regional_prompter_text([Region("a", (0, 0, 1, 0.25))], loras, "both", "", 512, 512)
    assert "Divide mode: Vertical" in stacked and "Divide ratio: 128,384" in stacked
    assert "both <lora:a:1> BREAK\nboth\n" in stacked  # the uncovered part: the global prompt, no LoRA
    quarters = regional_prompter_text([Region("a", (0, 0, 0.5, 0.5)), Region("b", (0.5, 0, 1, 0.5)),
                                       Region("c", (0, 0.5, 0.5, 1))], loras, "p", "", 512, 256)
    assert "Divide ratio: 128,256,256;128,256,256" in quarters
    assert "p <lora:a:1> ADDCOL\np <lora:b:0.8> ADDROW\np <lora:c:1> ADDCOL\np\n" in quarters
    masked = regional_prompter_text([Region("a", mask=np.ones((8, 8), np.float32))], loras, "p", "", 8, 8)
    assert "No Regional Prompter matrix" in masked and "mask" in masked


@pytest.mark.parametrize("extra, words", [
    (["--method", "auto"], "cannot express method 'auto': automatic regions are found while generating"),
    (["--method", "spatial_mole"], "cannot express method 'spatial_mole': spatial MoLE gates"),
    (["--method", "sum"], "cannot express method 'sum'"),
    (["--region", "dog=0,0,0.5,1", "--seeds", "1", "2"], "one --prompt and one --seeds value"),
    (["--region", "cat=0,0,0.5,1"], "a region for expert 'cat', which is not there"),
    (["--region", "dog=0,0,1.5,1"], "must satisfy 0 <= x0 < x1 <= 1"),
    (["--region", "dog=0,0,0.5,1", "--blend", "latent"], "--blend latent has no ComfyUI workflow"),  # was dropped
    (["--region", "dog=0,0,0.5,1", "--blend", "inpaint"], "--blend inpaint has no ComfyUI workflow"),
    (["--region", "dog=0,0,0.5,1", "--background", "style"], "--background is not exported to a workflow: give that "
     "expert a --region_mask"),
    (["--region", "dog=0,0,0.5,1", "--fit_steps", "2"], "--fit_steps is not exported to a workflow: fitting needs "
     "the latent or inpaint blend"),  # it advised --blend latent, which the workflow refuses too
])
def test_what_a_workflow_cannot_express_is_one_line_before_the_model(tmp_path, experts, extra, words, capsys):
    out = tmp_path / "out"
    assert _status(_export(tmp_path / "no-such-base", experts, out, *extra)) == 2  # the base is never opened
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_an_existing_export_is_kept_without_overwrite(tmp_path, experts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert _status(_export(tmp_path / "no-such-base", experts, out, "--region", "dog=0,0,0.5,1")) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_only_an_earlier_workflow_export_never_a_base_or_photos(tmp_path, tiny_sd15_dir, experts,
                                                                                    capsys):
    """--overwrite replaced whatever folder --out named, whole: a user lost a base model and their photos to it."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "0.png").write_bytes(b"a photo")
    region = ("--region", "dog=0,0,0.5,1")
    assert _status(_export(tmp_path / "no-such-base", experts, photos, *region, "--overwrite")) == 2  # before loading
    err = capsys.readouterr().err.strip()
    assert "holds files that are not a workflow export of ours" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in photos.iterdir()] == ["0.png"] and (photos / "0.png").read_bytes() == b"a photo"
    base = tmp_path / "base"
    shutil.copytree(tiny_sd15_dir, base)
    before = sorted(p.relative_to(base) for p in base.rglob("*"))
    assert _status(_export(base, experts, base, *region, "--overwrite")) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == before
    out = tmp_path / "export"  # an earlier export of ours is what --overwrite replaces
    assert _status(_export(base, experts, out, *region)) == 0
    (out / "loras" / "old.safetensors").write_bytes(b"an expert of the first export")
    (out / "my_notes.txt").write_text("mine")  # a file of the user's inside the earlier export: never lost
    (out / "renders").mkdir()
    assert _status(_export(base, experts, out, *region, "--overwrite")) == 2
    assert "holding files it did not write (my_notes.txt, renders); move them out first" in capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "loras" / "old.safetensors").exists()
    (out / "my_notes.txt").unlink()
    (out / "renders").rmdir()
    assert _status(_export(base, experts, out, *region, "--overwrite")) == 0, capsys.readouterr().err
    assert not (out / "loras" / "old.safetensors").exists() and (out / "workflow_api.json").is_file()


def test_an_sdxl_composition_exports_kohya_loras_with_both_text_encoders(tiny_sdxl_dir, tmp_path, capsys):
    dirs = make_experts(tiny_sdxl_dir, tmp_path / "experts", ("dog", "style"))
    out = tmp_path / "xl"
    status = main(_export(tiny_sdxl_dir, [str(dirs["dog"]), str(dirs["style"])], out, "--region", "dog=0,0,0.5,1",
                          "--region", "style=0.5,0,1,1", "--dtype", "fp32"))
    assert status == 0, capsys.readouterr().err
    assert workflow_problems(json.loads((out / "workflow_api.json").read_text())) == []
    assert not (out / "masks" / "xl-background.png").exists()  # the halves cover the image
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    experts = load_experts(pipe, [dirs["dog"], dirs["style"]])
    assert {"unet", "text_encoder", "text_encoder_2"} <= {c for e in experts for c, _ in e.layers}
    for expert in experts:
        folded, kind = read_lora_file(out / "loras" / f"{expert.name}.safetensors", pipe, expert.name)
        assert kind == "kohya" and set(folded.layers) == set(expert.layers)
        for key, lora in expert.layers.items():
            torch.testing.assert_close(folded.layers[key].delta(), lora.delta(), rtol=1e-5, atol=1e-6)


def test_without_size_the_workflow_has_generates_default_size(tiny_sd15_dir, experts, tmp_path, capsys):
    """No --size: the workflow's latent is generate's default size (>= 64 px), not the tiny model's raw 32 px,
    which `mole generate` refuses (the export wrote a 32x32 layout before)."""
    out = tmp_path / "nosize"
    argv = _export(tiny_sd15_dir, experts, out, "--region", "dog=0,0,0.5,1")
    at = argv.index("--size")
    assert main(argv[:at] + argv[at + 2:]) == 0, capsys.readouterr().err
    workflow = json.loads((out / "workflow_api.json").read_text())
    (latent,) = [v["inputs"] for v in workflow.values() if v["class_type"] == "EmptyLatentImage"]
    assert (latent["width"], latent["height"]) == (64, 64)


def test_mole_exports_help_names_the_workflow_export(capsys):
    """`mole export --help` listed only the MoLE targets: the regional layout's export could not be found from it."""
    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--to comfyui-workflow --experts A B --region" in " ".join(out.split())


def test_a_mole_file_to_a_workflow_says_why_first_not_that_a_prompt_is_missing(tmp_path, capsys):
    """With --mole and no --prompt the parser asked for --prompt; given one, the real reason came: a MoLE's gates
    have no workflow. The reason comes first now, before any file is read."""
    argv = ["export", "--to", "comfyui-workflow", "--base", str(tmp_path / "no-such-base"), "--mole",
            str(tmp_path / "no-such-mole"), "--out", str(tmp_path / "out")]
    assert _status(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot express method 'mole': MoLE's per-block gates have no ComfyUI node" in err, err
    assert len(err.splitlines()) == 1 and "--prompt" not in err and not (tmp_path / "out").exists()
    # with regions the method is regional, which a workflow expresses: no such refusal (the missing file is next)
    assert _status([*argv, "--region", "a=0,0,0.5,1", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot express" not in err and "no-such-mole" in err, err


def test_the_workflow_exports_out_is_its_folder_not_a_folder_of_images(tmp_path, experts, capsys):
    """--out's help and its is-a-file message were generate's ("folder for the PNGs", "the images go to")."""
    from moslora_diffusion.composition.export_cli import export_parser

    (out_action,) = [a for a in export_parser()._actions if a.dest == "out"]
    assert "export's folder" in out_action.help and "PNG" not in out_action.help
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    assert _status(_export(tmp_path / "no-such-base", experts, afile, "--region", "dog=0,0,0.5,1")) == 2
    err = capsys.readouterr().err
    assert "--out names the folder the export is written to" in err and afile.read_text() == "mine"
