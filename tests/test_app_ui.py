"""The Gradio wiring and the command line, without a browser (the browser test covers the same end to end)."""

import types

import pytest
from app_helpers import tiny_app_state
from conftest import make_adapter

from moslora_diffusion.app import cli
from moslora_diffusion.app.state import native_size
from moslora_diffusion.app.ui import MAX_SLOTS, _on_generate, build_ui, slot_updates


@pytest.fixture(scope="module")
def state(tiny_sd15_dir, tmp_path_factory):
    app, given = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    app.load_adapter(make_adapter(tiny_sd15_dir, given / "dog" / "moslora.safetensors", seed=1), scale=0.7)
    return app


def test_the_ui_builds_with_its_api(state):
    demo = build_ui(state)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"generate", "export", "load_adapter", "train", "cancel_training", "status"} <= names
    updates = slot_updates(state, with_values=True)
    assert len(updates) == MAX_SLOTS and updates[0]["label"] == "dog scale" and updates[0]["value"] == 0.7
    assert updates[1]["visible"] is False


def test_generate_handler_returns_images_or_a_visible_message(state):
    handler = _on_generate(state)
    scales = [0.4] + [1.0] * (MAX_SLOTS - 1)
    gallery, infotext, message, status = handler("a photo of sks dog", "", 3, 2, 5.0, 64, 64, 1, "Euler", False,
                                                 *scales, progress=lambda *a, **k: None)
    assert len(gallery) == 1 and gallery[0][0].endswith(".png") and message == ""
    assert "Lora scales: dog: 0.4" in infotext and "**dog**" in status
    *_, message, _ = handler("", "", 3, 500, 5.0, 4096, 64, 1, "Euler", False, *scales,
                             progress=lambda *a, **k: None)
    assert message.startswith("⚠️") and "enter a prompt" in message and "steps" in message and "width" in message


def test_the_header_shows_the_model_and_each_adapters_trigger_prompt_not_internals(state):
    state.fusion.set_scales({"dog": 0.7})
    header = state.status_text()
    assert header == ("Base model **model** (Stable Diffusion 1.x) · adapters: **dog** (trigger “a photo of sks dog”, "
                      "scale 0.7)")
    assert f"{id(state.pipe):x}" not in header and "model loads" not in header
    assert state.status()["pipeline_id"] == f"{id(state.pipe):x}"  # still there for monitoring, over the API
    assert state.status()["trigger_prompts"] == {"dog": "a photo of sks dog"}


def test_the_prompt_box_starts_with_the_trigger_prompt(state):
    demo = build_ui(state)
    box = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "prompt")
    assert box["props"]["value"] == "a photo of sks dog"
    assert box["props"]["placeholder"] == "e.g. a photo of sks dog, on the beach"


def test_without_adapters_the_header_says_how_to_get_one(tiny_sd15_dir, tmp_path_factory):
    app, _ = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    assert app.status_text() == ("Base model **model** (Stable Diffusion 1.x) · no adapter loaded: load one under "
                                 "*Adapters* or train one on the *Train* tab")
    assert app.suggested_prompt() == ""


def test_default_size_is_the_models_native_size(state):
    assert state.default_size == 64  # tiny: 32 px native, raised to the 64 px minimum
    def fake(sample, factor):
        return types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=sample)),
                                     vae_scale_factor=factor)
    assert [native_size(fake(s, 8), 0) for s in (64, 96, 128)] == [512, 768, 1024]  # SD 1.5, SD 2.1-v, SDXL
    assert native_size(object(), 512) == 512


def test_command_line(tmp_path, monkeypatch, capsys):
    args = cli.build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert cli.build_parser().parse_args(["--auth", "me:se:cret"]).auth == ("me", "se:cret")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--auth", "nopassword"])
    assert cli.default_base_model() == cli.TOY_BASE  # the shipped trained toy model, when the repo has it
    monkeypatch.setattr(cli, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cli, "TOY_BASE", tmp_path / "no-toy-base")  # a package without the repo's assets
    folder = cli.default_base_model()
    assert (folder / "model_index.json").is_file() and folder == tmp_path / "tiny-sd15"
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert cli.default_base_model() == folder and (folder / "model_index.json").stat().st_mtime_ns == stamp
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "moslora.safetensors").write_bytes(b"")
    monkeypatch.setattr(cli, "DEMO_ADAPTER", demo)
    assert cli.default_adapters(cli.TOY_BASE) == [str(demo)] and cli.default_adapters(folder) == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--base", str(folder), "--adapter", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"\nerror: --adapter {tmp_path / 'missing'}: no such file or folder\n")


def _refuse_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize("case", ["photos file", "photos missing", "dreambooth folder", "empty folder",
                                  "not safetensors", "other safetensors"])
def test_bad_photos_dir_and_mole_are_refused_in_one_line_before_the_model_loads(case, tmp_path, monkeypatch,
                                                                                  capsys):
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from moslora_diffusion.app import state

    monkeypatch.setattr(state, "load_base_pipeline", _refuse_loading)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", _refuse_loading)
    monkeypatch.setattr(cli, "default_base_model", _refuse_loading)  # nor is the tiny default model written
    photos = tmp_path / "photos.jpg"
    photos.write_bytes(b"a photo, not a folder")
    run = tmp_path / "dog-run"  # what train_dreambooth.py writes: one expert's adapter, no gates
    run.mkdir()
    (run / "moslora.safetensors").write_bytes(b"never read")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    flags, expected = {
        "photos file": (["--photos_dir", str(photos)], f"--photos_dir {photos} is a file; give a folder of photos"),
        "photos missing": (["--photos_dir", str(tmp_path / "nope")],
                           f"--photos_dir {tmp_path / 'nope'}: no such folder; give a folder of photos"),
        "dreambooth folder": (["--mole", str(run)],
                              f"--mole {run} is a DreamBooth training folder (one expert's moslora.safetensors), not "
                              "a MoLE: give it with --adapter, or train gates over several experts on the Compose "
                              "tab or with `python -m moslora_diffusion.mole train`"),
        "empty folder": (["--mole", str(empty)], f"--mole {empty}: no mole.safetensors in that folder; give a MoLE "
                                                 "file or the gate-training folder holding it"),
        "not safetensors": (["--mole", str(tmp_path / "notes.txt")],
                            f"--mole {tmp_path / 'notes.txt'} is not a .safetensors file; give a MoLE file "
                            "(mole.safetensors) or the gate-training folder holding it"),
        "other safetensors": (["--mole", str(tmp_path / "lora.safetensors")],
                              f"{tmp_path / 'lora.safetensors'} is not a MoLE file"),  # ...; goes to --adapter
    }[case]
    out = tmp_path / "outputs"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--base", str(tmp_path / "base"), "--output_dir", str(out), *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {expected}") and sum(line.startswith("error") for line in lines) == 1
    if case == "other safetensors":  # an expert's own file given to the wrong flag: where it goes
        assert lines[-1].endswith("; an adapter (moslora.safetensors or a LoRA file) goes to --adapter")
    assert not out.exists()  # nothing written


def test_a_mole_file_its_folder_and_a_photo_folder_pass_the_flag_checks(tiny_sd15_dir, tmp_path):
    from mole_helpers import make_experts
    from test_app_compose import write_mole

    experts = make_experts(tiny_sd15_dir, tmp_path / "experts", ("dog", "cat"))
    mole = write_mole(tiny_sd15_dir, [experts["dog"], experts["cat"]], tmp_path / "gates" / "mole.safetensors")
    (tmp_path / "photos").mkdir()
    for given in (mole, mole.parent):
        cli.check_paths(cli.build_parser().parse_args(["--mole", str(given), "--photos_dir", str(tmp_path / "photos")]))


def test_the_running_line_says_every_interface_when_host_opened_them():
    """--host 0.0.0.0 printed Gradio's "http://localhost:7999/", as if the flag had been ignored."""
    local = "http://127.0.0.1:7860/"
    assert cli.running_line("127.0.0.1", local) == f"Running on {local} (Ctrl-C stops it)"
    assert cli.running_line("0.0.0.0", "http://localhost:7999/") == (
        "Running on every network interface, port 7999 (http://localhost:7999/ on this machine, http://<its "
        "address>:7999 from others) (Ctrl-C stops it)")
    assert cli.running_line("127.0.0.1", "http://127.0.0.1:7860/", "https://x.gradio.live").endswith(
        "http://127.0.0.1:7860/ and https://x.gradio.live (Ctrl-C stops it)")
