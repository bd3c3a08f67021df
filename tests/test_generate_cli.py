"""`python -m moslora_diffusion.generate`: images with reproducible parameters, clear errors."""

from datetime import datetime

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
    # only images, in <out>/<date>/ as `mole generate` writes them (it was <out>/images/<date>/); the app's empty
    # training/ and mole/ job folders were once made in --out too
    assert [p.parent for p in pngs] == [out / datetime.now().strftime("%Y-%m-%d")] * 8
    assert [p.name for p in out.iterdir()] == [pngs[0].parent.name]
    # the last line names the folder the images are in, not only --out
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


def test_a_prompt_past_clips_window_is_one_line_of_ours_not_two_library_paragraphs(tiny_sd15_dir, tmp_path):
    """diffusers logged the whole dropped text (thousands of characters) and transformers a paragraph more; the
    note now says how long the prompt is, where CLIP cuts it, and nothing else; a prompt that fits says nothing."""
    import logging
    import warnings

    from diffusers import DiffusionPipeline

    from moslora_diffusion.generation.long_prompts import long_prompt_note, quiet_library_notes

    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    limit = pipe.tokenizer.model_max_length
    long = " ".join(f"w{i}" for i in range(3 * limit))
    note = long_prompt_note(pipe.tokenizer, long)
    count = len(pipe.tokenizer(long, truncation=False, verbose=False).input_ids)
    assert count > limit and note.startswith(f"the prompt is {count} tokens; CLIP reads the first {limit}, up to")
    assert "\n" not in note and len(note) < 200 and note.endswith("the rest is dropped")
    assert long_prompt_note(pipe.tokenizer, "a photo of sks dog") is None
    quiet_library_notes()
    quiet_library_notes()  # idempotent: one filter per handler
    for name in ("diffusers", "transformers"):
        handler = logging.getLogger(name).handlers[0]  # the library's own stderr handler
        assert sum(type(f).__name__ == "_DropReplaced" for f in handler.filters) == 1
        dropped = logging.LogRecord(name, logging.WARNING, __file__, 1, "The following part of your input was "
                                    "truncated because CLIP can only handle sequences up to 77 tokens: ['w']", (), None)
        kept = logging.LogRecord(name, logging.WARNING, __file__, 1, "another warning", (), None)
        assert not handler.filter(dropped) and handler.filter(kept)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["--base", str(tiny_sd15_dir), "--prompt", long, "--seeds", "1", "--steps", "1", "--size", "64",
              "--out", str(tmp_path / "samples")])
    assert [str(w.message) for w in caught if "tokens" in str(w.message)] == [note]


def test_a_bad_request_on_the_command_line_names_the_flag(tmp_path, capsys):
    """The command lines said the app's words ("enter a prompt", "width must be ..., height must be ..."): the flag
    to fix was left to guess, and --size's one problem was said twice."""
    from moslora_diffusion.generation.text_to_image import command_line_problems

    assert command_line_problems("enter a prompt; width must be a multiple of 8 between 64 and 2048, got 33; height "
                                 "must be a multiple of 8 between 64 and 2048, got 33; scale of 'dog' must be ...") == (
        "--prompt is empty: enter a prompt; --size must be a multiple of 8 between 64 and 2048, got 33; scale of "
        "'dog' must be ...")
    def status(command, argv) -> int:
        try:
            return command(argv)
        except SystemExit as stop:
            return stop.code

    base = tmp_path / "no-such-base"  # never opened: the request is checked first
    assert status(main, ["--base", str(base), "--prompt", " ", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --prompt is empty: enter a prompt"
    assert status(main, ["--base", str(base), "--prompt", "x", "--guidance", "31", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --guidance must be between 0 and 30, got 31.0"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("second", ["folder", "file"])
def test_an_adapter_given_twice_is_one_line_before_the_model_loads(tmp_path, capsys, tiny_sd15_dir, second):
    """The same adapter twice (its folder twice, or the folder and its moslora.safetensors) loaded the model and
    then failed with "zip() argument 2 is longer than argument 1". The base here does not exist."""
    adapter = make_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors", seed=1)
    again = adapter.parent if second == "folder" else adapter
    capsys.readouterr()  # the tiny model's loading bars, from making the adapter
    with pytest.raises(SystemExit) as stop:
        main(["--base", str(tmp_path / "no-model"), "--adapter", str(adapter.parent), "--adapter", str(again),
              "--prompt", "p", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f"--adapter {adapter.resolve()} is given twice; give each adapter once" in err
    assert not (tmp_path / "out").exists()


def test_a_mole_folder_as_an_adapter_says_where_it_goes(tmp_path, capsys):
    """A gate-training folder (mole.safetensors) said "no adapter file there (expected moslora.safetensors ...)"."""
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "mole.safetensors").write_bytes(b"not read")
    with pytest.raises(SystemExit) as stop:
        main(["--base", str(tmp_path / "no-model"), "--adapter", str(gates), "--prompt", "p",
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f"{gates} holds a MoLE (mole.safetensors), not an adapter: load it with --mole (app.py), or `python -m " \
           f"moslora_diffusion.mole generate --mole {gates}`" in err


@pytest.mark.parametrize("keys, says", [
    ({"emb_params": (2, 8)}, "is a textual-inversion embedding (a trigger word's vectors), not an adapter: A1111 and "
                             "ComfyUI load it as an embedding; here, give the training folder it came from"),
    ({"clip_l": (2, 8), "clip_g": (2, 16)}, "is a textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "is a whole model checkpoint, not an adapter: give "
                                                                 "it as --base"),
])
def test_an_embedding_or_checkpoint_as_an_adapter_says_what_it_is(tmp_path, capsys, keys, says):
    """It said "unexpected key 'emb_params' in adapter file (expected *.moslora_A / _M / _B)", after loading."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "given.safetensors"
    save_file({k: torch.ones(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(SystemExit) as stop:
        main(["--base", str(tmp_path / "no-model"), "--adapter", str(path), "--prompt", "p",
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"{path} {says}" in err, err
