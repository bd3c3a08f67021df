"""`python -m moslora_diffusion.mole generate --method ...`: images and mask pictures written with the method and
regions in the PNG text; every bad layout is one line, exit status 2, before the model loads, nothing written."""

import numpy as np
import pytest
from mole_helpers import make_experts
from PIL import Image

from moslora_diffusion.composition.cli import main
from moslora_diffusion.mole import attach_mole, detach_mole, load_experts, save_mole


@pytest.fixture(scope="module")
def experts(tiny_sd15_dir, tmp_path_factory):
    dirs = make_experts(tiny_sd15_dir, tmp_path_factory.mktemp("experts"), ("dog", "style"))
    return [str(dirs["dog"]), str(dirs["style"])]


def _common(model, out):
    return ["generate", "--base", str(model), "--prompt", "a photo of sks dog and a cat", "--steps", "2",
            "--size", "64", "--sampler", "DDIM", "--out", str(out)]


def test_regional_writes_images_masks_and_the_layout_in_the_png_text(tiny_sd15_dir, experts, tmp_path, capsys):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "right.png")
    out = tmp_path / "out"
    status = main([*_common(tiny_sd15_dir, out), "--experts", *experts, "--method", "regional",
                   "--region", "dog=0,0,0.5,1", "--region_mask", f"style={tmp_path / 'right.png'}",
                   "--region_prompt", "dog=a photo of sks dog", "--seeds", "0", "1"])
    assert status == 0, capsys.readouterr().err
    images = sorted(p for p in out.rglob("*-regional.png"))
    assert len(images) == 2
    assert [p.name for p in images] == ["00000-0-regional.png", "00001-1-regional.png"]  # masks skipped numbers
    text = Image.open(images[0]).text["parameters"]
    assert "Composition: regional" in text
    assert "Regions: dog: box 0,0,0.5,1 (a photo of sks dog) | style: mask" in text.replace('"', "")
    dog = np.asarray(Image.open(images[0].with_name(images[0].stem + "-mask-dog.png")), dtype=np.float32) / 255
    style = np.asarray(Image.open(images[0].with_name(images[0].stem + "-mask-style.png")), dtype=np.float32) / 255
    assert dog[:, :32].min() == 1 and dog[:, 32:].max() == 0 and np.array_equal(style, mask / 255)


@pytest.mark.parametrize("extra, message", [
    (["--method", "mole", "--region", "dog=0,0,0.5,1"], "method 'mole' takes no regions"),
    (["--method", "mole", "--blend", "latent"], "--blend is for --method regional"),
    (["--every", "3"], "--every is for --method switch; this run has --method mole (the default here)"),
])
def test_a_mole_file_with_options_mole_does_not_take_is_refused(tiny_sd15_dir, experts, tmp_path, capsys, extra,
                                                                 message):
    """With --mole and method mole the command went straight to MoLE's generation: regions, --blend and the other
    methods' flags were dropped without a word and a plain MoLE image was written."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([*_common(tiny_sd15_dir, out), "--mole", str(tmp_path / "no-such-mole"), *extra])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_mole_file_gives_the_experts_and_the_default_method_is_mole(tiny_sd15_dir, experts, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    attach_mole(pipe, load_experts(pipe, experts))
    path = save_mole(detach_mole(pipe), tmp_path / "mole.safetensors")
    assert main([*_common(tiny_sd15_dir, tmp_path / "a"), "--mole", str(path), "--heatmap"]) == 0
    assert len(list((tmp_path / "a").rglob("*-mole-gates.png"))) == 1  # the MoLE path, as before
    assert main([*_common(tiny_sd15_dir, tmp_path / "b"), "--mole", str(path), "--method", "auto",
                 "--trigger", "dog=dog", "--trigger", "style=cat", "--auto_steps", "1"]) == 0
    written = sorted(p.name for p in (tmp_path / "b").rglob("*.png"))
    assert len(written) == 3 and sum("-mask-" in n for n in written) == 2, capsys.readouterr().err
    # regions with a MoLE file and no --method ask for a layout: regional (it was mole, the regions dropped)
    assert main([*_common(tiny_sd15_dir, tmp_path / "c"), "--mole", str(path), "--region", "dog=0,0,0.5,1"]) == 0
    written = sorted(p.name for p in (tmp_path / "c").rglob("*.png"))
    assert written == ["00000-0-regional-mask-dog.png", "00000-0-regional-mask-style.png", "00000-0-regional.png"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "regional", "--region", "cow=0,0,1,1"], "a region for expert 'cow', which is not there"),
    (["--method", "sum", "--region", "dog=0,0,1,1"], "method 'sum' takes no regions"),
    (["--method", "regional", "--region", "dog=0,0,1"], "a box is 4 numbers"),
    (["--method", "regional", "--region_mask", "dog=small.png"], "the mask is 32x32 but the image is 64x64"),
    (["--method", "regional", "--region_mask", "dog=colour.png"], "not a mask (a colour picture)"),
    (["--method", "regional", "--region_mask", "dog=notes.png"], "not an image"),
    (["--method", "auto", "--trigger", "dog=zebra"], "the prompt does not contain 'dog''s trigger word 'zebra'"),
    (["--method", "auto", "--trigger", "cow=dog"], "--trigger for expert 'cow', which is not there"),
    (["--method", "regional", "--region", "dog=0,0,1,1", "--mask", "style"],
     "--mask is for --method mole; with --method regional leave the expert out of --experts instead"),
    (["--method", "switch", "--heatmap"], "--heatmap draws learned gates (--method mole); --method switch has none"),
    (["--method", "regional", "--region_prompt", "dog=a dog"], "give a box or a mask (exactly one)"),
    (["--method", "sum", "--blend", "latent"], "--blend is for --method regional and --region / --region_mask; this "
     "run has --method sum"),
    (["--blend", "latent"], "--blend is for --method regional and --region / --region_mask; this run has --method "
     "nla (the default here)"),  # it blamed a method the user never chose: "method 'nla' takes no option blend"
    (["--method", "regional", "--region", "dog=0,0,1,1", "--trigger", "dog=sks"],
     "--trigger is for --method auto; this run has --method regional"),  # it said "takes no option triggers"
    (["--method", "auto", "--trigger", "dog=sks", "--trigger", "dog=dog"], "--trigger given twice for one expert"),
    (["--method", "regional", "--region_mask", "dog=wide.png"], "the mask is 96x64, but this command draws square"),
    (["--method", "sum", "--size", "0"], "0 px: give the image's side in pixels"),  # 0 drew at the model's size
    (["--region", "dog=0,0,0.5,1", "--fit_steps", "1"], "fit_steps needs --blend latent or inpaint"),
    (["--region", "dog=0,0,0.5,1", "--blend", "latent", "--fit_steps", "2"], "fit_steps 2: give a whole number of "
     "steps, at least 1 and below the 2 denoising steps"),
    (["--method", "sum", "--background", "style"], "--background is for --method regional and --region / "
     "--region_mask; this run has --method sum"),
    (["--region", "dog=0,0,0.5,1", "--background", "cow"], "background 'cow' is not one of the experts (dog, style)"),
    (["--region", "dog=0,0,0.5,1", "--background", "dog"], "'dog' is the background: it draws wherever the other "
     "regions leave room and reads the global prompt; give it no region or region prompt of its own"),
    (["--region", "dog=0,0,0.5,1", "--region_prompt", "style=zz", "--background", "style"], "'style' is the "
     "background"),  # it said "give a box or a mask", then refused the box
    (["--region", "dog=0,0,0.5,1", "--background", "style", "--background", "dog"], "--background given twice; "
     "one expert draws the background"),  # the last one silently won
    # the experts' training prompts are read from their files' headers: this was only found after loading
    # (both tiny experts record "a photo of sks dog": no word tells them apart, whatever the prompt)
    (["--method", "auto", "--prompt", "a photo of a horse"], "every word of expert 'dog''s training prompt ('a photo "
     "of sks dog') is another expert's too"),
])
def test_bad_layouts_fail_before_the_model_loads(experts, tmp_path, capsys, extra, message):
    _bad_layout(experts, tmp_path, capsys, extra, message, with_size="wide.png" not in " ".join(extra))


def test_a_mask_that_cannot_be_the_image_size_is_named_without_size(experts, tmp_path, capsys):
    """Without --size the image takes the mask's size: a 40x40 mask was refused as 'width must be a multiple of
    8', which named neither the mask nor the fix."""
    _bad_layout(experts, tmp_path, capsys, ["--method", "regional", "--region_mask", "dog=small40.png"],
                "--region_mask dog: the mask is 40x40; without --size the image takes the mask's size", False)


def _bad_layout(experts, tmp_path, capsys, extra, message, with_size):
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")  # white: an all-black mask is refused as empty
    Image.new("L", (40, 40), 255).save(tmp_path / "small40.png")
    Image.new("L", (96, 64), 255).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "colour.png")
    (tmp_path / "notes.png").write_text("not a picture")
    extra = [e.replace("small.png", str(tmp_path / "small.png")).replace("colour.png", str(tmp_path / "colour.png"))
             .replace("notes.png", str(tmp_path / "notes.png")).replace("small40.png", str(tmp_path / "small40.png"))
             .replace("wide.png", str(tmp_path / "wide.png")) for e in extra]
    out = tmp_path / "out"
    common = _common(tmp_path / "no-model-here", out)
    if not with_size:
        at = common.index("--size")
        common = common[:at] + common[at + 2:]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--experts", *experts, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("command, extra", [("generate", []), ("generate", ["--blend", "latent"]),
                                            ("export", ["--to", "comfyui-workflow"])])
def test_an_all_black_or_faint_region_mask_is_refused_naming_expert_and_file(experts, tmp_path, capsys, command, extra):
    """An all-black --region_mask was accepted and its expert silently never appeared (a zero-area box was already
    refused): one line naming the expert and the file, exit status 2, before the model loads, nothing written. So
    is a 0/1 label picture (its region reads 1/255: the expert at 0.4% of its scale, as good as absent). A mask
    with one white pixel, or a soft one at 26/255, is a region: it passes, and the run goes on to the (missing)
    model."""
    black, label, small, soft = (tmp_path / f"{n}.png" for n in ("black", "label", "small", "soft"))
    Image.new("L", (64, 64), 0).save(black)
    for path, value in ((label, 1), (small, 255), (soft, 26)):
        picture = Image.new("L", (64, 64), 0)
        picture.putpixel((5, 5), value)
        picture.save(path)
    out = tmp_path / "out"
    common = [command, *_common(tmp_path / "no-model-here", out)[1:], "--experts", *experts, *extra,
              "--region", "style=0,0,0.5,1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--region_mask", f"dog={black}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"--region_mask dog={black}: the mask is empty (all black), so the expert would never appear: paint the " \
           "expert's region white" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--region_mask", f"dog={label}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"--region_mask dog={label}: the mask's brightest pixel is 1/255, so the expert would barely act (a 0/1 " \
           "label picture?): paint the expert's region white (255)" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "black.png", "label.png", "small.png", "soft.png"]
    for path in (small, soft):
        with pytest.raises(SystemExit):
            main([*common, "--region_mask", f"dog={path}"])
        err = capsys.readouterr().err
        assert "no-model-here" in err and "empty" not in err and "brightest" not in err, err


@pytest.mark.parametrize("extra", [["--method", "switch", "--every", "1"], ["--method", "composite"],
                                   ["--method", "sum"]])
def test_the_whole_image_methods_run_from_the_same_command(tiny_sd15_dir, experts, tmp_path, capsys, extra):
    out = tmp_path / "out"
    assert main([*_common(tiny_sd15_dir, out), "--experts", *experts, *extra]) == 0, capsys.readouterr().err
    (image,) = out.rglob("*.png")  # no mask pictures: these methods act on the whole image
    assert f"Composition: {extra[1]}" in Image.open(image).text["parameters"]


def test_regional_latent_blend_runs_and_is_recorded(tiny_sd15_dir, experts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*_common(tiny_sd15_dir, out), "--experts", *experts, "--region", "dog=0,0,0.5,1",
                 "--region", "style=0.5,0,1,1", "--blend", "latent"]) == 0, capsys.readouterr().err
    (image,) = out.rglob("*-regional.png")
    assert "Blend: latent" in Image.open(image).text["parameters"]


def test_a_fitted_latent_blend_with_a_background_expert_runs_and_is_recorded(tiny_sd15_dir, experts, tmp_path,
                                                                             capsys):
    out = tmp_path / "out"
    assert main([*_common(tiny_sd15_dir, out), "--experts", *experts, "--region", "dog=0,0,0.5,1", "--background",
                 "style", "--blend", "latent", "--fit_steps", "1"]) == 0, capsys.readouterr().err
    (image,) = out.rglob("*-regional.png")
    text = Image.open(image).text["parameters"]
    assert "Background: style" in text and "Fit steps: 1" in text and "Blend: latent" in text
    dog = np.asarray(Image.open(image.with_name(image.stem + "-mask-dog.png")), dtype=np.int32)
    style = np.asarray(Image.open(image.with_name(image.stem + "-mask-style.png")), dtype=np.int32)
    assert dog[:, 32:].max() == 0 and np.array_equal(dog + style, np.full_like(dog, 255))  # fitted: the rest


def test_one_expert_in_one_region(tiny_sd15_dir, experts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*_common(tiny_sd15_dir, out), "--experts", experts[0], "--region", "dog=0.25,0.25,0.75,0.75"]) == 0
    assert len(list(out.rglob("*-mask-dog.png"))) == 1, capsys.readouterr().err


def test_without_size_the_images_have_generates_default_size(tiny_sd15_dir, experts, tmp_path, capsys):
    """The tiny model's native size is 32 px, below the 64 px the requests accept: without --size the command
    draws at generate's default (native_size: >= 64), as `python -m moslora_diffusion.generate` does (it was
    refused after the model loaded: 'width must be a multiple of 8 between 64 and 2048, got 32')."""
    out = tmp_path / "out"
    common = _common(tiny_sd15_dir, out)
    at = common.index("--size")
    argv = common[:at] + common[at + 2:] + ["--experts", *experts, "--method", "regional",
                                            "--region", "dog=0,0,0.5,1", "--seeds", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    (image,) = out.rglob("*-regional.png")
    assert Image.open(image).size == (64, 64)


def test_exporting_experts_without_gates_names_the_commands_that_can(experts, tmp_path, capsys):
    """`mole export --experts ... --to lora-kohya` answered 'the following arguments are required: --mole'."""
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as stop:
        main(["export", "--base", "unused", "--experts", *experts, "--to", "lora-kohya", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and not out.exists(), err
    assert "python -m moslora_diffusion.export --adapter A:1 --adapter B:1 --to lora-kohya" in err
    assert "--to comfyui-workflow" in err


def test_a_pivotal_tuning_expert_is_refused_before_the_model_loads(experts, tmp_path, capsys):
    """The preset toy-subject turns pivotal tuning on; such an expert was refused only after the model loaded,
    with advice naming neither the preset nor the flag."""
    import json
    import shutil

    from moslora_diffusion.files.safetensors_io import load_tensors, save_tensors

    pivotal = tmp_path / "star"
    shutil.copytree(experts[0], pivotal)
    tensors, metadata = load_tensors(pivotal / "moslora.safetensors")
    record = json.loads(metadata["moslora"]) | {"token_abstraction": "sks"}
    save_tensors(tensors, pivotal / "moslora.safetensors", metadata | {"moslora": json.dumps(record)})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([*_common(tmp_path / "no-model-here", out), "--experts", str(pivotal), experts[1],
              "--region", "star=0,0,0.5,1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "trained with pivotal tuning (learned vectors for 'sks'; the preset toy-subject turns it on)" in err
    assert "--no-train_text_encoder_ti" in err and not out.exists()


def test_a_folder_where_a_file_belongs_is_named_for_what_it_is(experts, tmp_path, capsys):
    """A folder as a mask read "mask file not found"; a DreamBooth folder as --mole read "mole.safetensors: no such
    file": both sent users looking for a typo."""
    out = tmp_path / "out"
    for extra, message in (
            (["--experts", *experts, "--region_mask", f"dog={tmp_path}"],
             f"{tmp_path} is a folder; a mask is a greyscale PNG file (white = the region)"),
            (["--mole", experts[0]], f"--mole {experts[0]} is a DreamBooth training folder (one expert's "
             "moslora.safetensors), not a MoLE: give it with --experts")):
        with pytest.raises(SystemExit) as stop:
            main([*_common(tmp_path / "no-model-here", out), *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
        assert not out.exists()


@pytest.mark.parametrize("method", ["mole", "spatial_mole"])
def test_a_gated_method_without_a_mole_file_is_refused(experts, tmp_path, capsys, method):
    """--method mole with --experts and no --mole drew with equal gates (the NLA mix) and labelled the image
    "Composition: mole": one line now, before the model loads (the base here does not exist)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([*_common(tmp_path / "no-model-here", out), "--experts", *experts, "--method", method])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f"--method {method} needs trained gates: give a MoLE file (--mole, from `mole train`) instead of " \
           "--experts; with equal gates it would be --method nla" in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "regional", "--region", "dog=0,0,0.5,1", "--blend", "latent", "--fit_steps", "50"],
     "error: --fit_steps 50: give a whole number of steps, at least 1 and below the 2 denoising steps"),
    (["--method", "auto", "--threshold", "2"], "error: --threshold must lie in (0, 1]"),
    (["--method", "auto", "--auto_steps", "9"], "error: --auto_steps must be a whole number of steps from 1 to 2"),
    (["--method", "switch", "--every", "0"], "error: --every (steps between switches) must be"),
    (["--method", "regional", "--region", "dog=0,0,0.5,1", "--background", "cow"],
     "error: --background 'cow' is not one of the experts"),
])
def test_an_option_is_named_by_its_flag(experts, tmp_path, capsys, extra, message):
    """The command's errors named compose()'s options ("fit_steps 50: ...", "threshold must ...") without their
    dashes, where every other error names the flag."""
    with pytest.raises(SystemExit) as stop:
        main([*_common(tmp_path / "no-model-here", tmp_path / "out"), "--experts", *experts, *extra])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
