"""Errors found late still end in one line: what the model's files tell is checked before loading, and every
command ends through console/exits.py (`error: ...`, exit status 2; the traceback only with --debug)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from training_helpers import REPO, cli_env, forbid_model_load, make_photos, reset_accelerate, run_training, tiny_config

from moslora_diffusion import export, generate, pipeline_adapters, tiny
from moslora_diffusion.app import cli as app_cli
from moslora_diffusion.console import run_command
from moslora_diffusion.files.safetensors_io import WeightFileError
from moslora_diffusion.models.loading import ModelFolderError, load_pipeline
from moslora_diffusion.moslora.inject import AdapterError
from moslora_diffusion.moslora.pipeline import attach_to_pipeline
from moslora_diffusion.training import ConfigError
from moslora_diffusion.training import main as train_main

RANK_MESSAGE = ("--rank 64 is larger than the width of unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q "
                "(32 features); the largest --rank these targets allow on this model is 32")


def _refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if diffusers is asked to load a pipeline."""
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", _refuse)


@pytest.fixture
def no_loading(monkeypatch, no_weights_read):
    """Fails the test if the app or `generate` even start loading the base model."""
    from moslora_diffusion.app import state

    monkeypatch.setattr(state, "load_base_pipeline", _refuse)


@pytest.fixture
def broken_models(tiny_sd15_dir, tmp_path):
    """Copies of the tiny model: one without unet/, one whose UNet weights are a pickle (.bin) only."""
    no_unet = shutil.copytree(tiny_sd15_dir, tmp_path / "no-unet")
    shutil.rmtree(no_unet / "unet")
    bin_only = shutil.copytree(tiny_sd15_dir, tmp_path / "bin-only")
    unet = bin_only / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    return no_unet, bin_only


# --- the shared command runner ------------------------------------------------------------------------------


def _fail_with(err: BaseException):
    def body(argv):
        body.argv = argv
        raise err
    return body


@pytest.mark.parametrize(("err", "status", "line"), [
    (ValueError("--rank must be > 0"), 2, "error: --rank must be > 0"),
    (OSError("Error no file named config.json found\n  in directory m."), 2,
     "error: Error no file named config.json found in directory m."),
    (ImportError("No module named 'bitsandbytes'"), 2, "error: No module named 'bitsandbytes'"),
    (RuntimeError("shape mismatch"), 1, "error: unexpected RuntimeError: shape mismatch (a bug; run again with "
                                        "--debug (or MOSLORA_DEBUG=1) for the traceback)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1,
     "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); use a smaller batch or resolution, "
     "or half precision (training: --gradient_checkpointing, --mixed_precision fp16 or bf16)"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_every_failure_ends_in_one_line_and_an_exit_status(err, status, line, capsys, monkeypatch):
    monkeypatch.delenv("MOSLORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_command(_fail_with(err), ["--flag", "x"])
    assert exit_info.value.code == status
    assert capsys.readouterr().err == line + "\n"


def test_our_warnings_are_one_line_and_others_keep_pythons_format(tmp_path, capsys):
    """A sub-folder that is not `<repeats>_<prompt>` printed `.../scan.py:151: UserWarning: ignoring ...` and the
    source line under it."""
    import warnings

    from moslora_diffusion.data.scan import scan_instance_folder

    make_photos(tmp_path / "photos", 2)
    (tmp_path / "photos" / "extras").mkdir()

    def body(_argv):
        with warnings.catch_warnings():  # pytest records warnings; print them the way Python does outside pytest
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            scan_instance_folder(tmp_path / "photos", "a photo of sks dog")  # warns from inside the package
            warnings.warn("a library's own warning", UserWarning, stacklevel=1)

    assert run_command(body, []) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"warning: ignoring sub-folder {tmp_path / 'photos' / 'extras'}: name is not "
                      "'<repeats>_<prompt>' (e.g. '10_sks dog')")
    assert "test_command_errors.py" in err[1] and "UserWarning: a library's own warning" in err[1]
    assert warnings.formatwarning.__name__ == "formatwarning"  # Python's own again after the command


def test_debug_shows_the_traceback_instead(capsys, monkeypatch):
    monkeypatch.delenv("MOSLORA_DEBUG", raising=False)
    body = _fail_with(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_command(body, ["--debug", "--flag", "x"])
    assert body.argv == ["--flag", "x"] and capsys.readouterr().err == ""  # the command never sees --debug
    monkeypatch.setenv("MOSLORA_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        run_command(_fail_with(ValueError("bad")), [])
    assert run_command(lambda argv: None, []) == 0


@pytest.mark.parametrize("command", ["train", "generate", "export", "app"])
def test_every_command_reports_a_broken_model_folder_in_one_line(command, broken_models, tmp_path, capsys,
                                                                  no_weights_read, monkeypatch):
    monkeypatch.delenv("MOSLORA_DEBUG", raising=False)
    no_unet, _ = broken_models
    photos, adapter = make_photos(tmp_path / "photos"), tmp_path / "adapter.safetensors"
    adapter.write_bytes(b"not checked: the base model fails first")
    argv = {"train": ["--pretrained_model_name_or_path", str(no_unet), "--instance_data_dir", str(photos),
                      "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out")],
            "generate": ["--base", str(no_unet), "--prompt", "a dog", "--out", str(tmp_path / "out")],
            "export": ["--base", str(no_unet), "--adapter", str(adapter), "--to", "lora-kohya",
                       "--out", str(tmp_path / "out" / "lora.safetensors")],
            "app": ["--base", str(no_unet), "--output_dir", str(tmp_path / "out")]}[command]
    main = {"train": train_main, "generate": generate.main, "export": export.main, "app": app_cli.main}[command]
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {no_unet} has no unet/ folder") and err.count("\n") == 1
        with pytest.raises(ModelFolderError):  # --debug: the exception itself, for its traceback
            main([*argv, "--debug"])
    finally:
        reset_accelerate()
    assert not (tmp_path / "out" / "lora.safetensors").exists() and not list((tmp_path / "out").rglob("*.png"))


def test_tiny_without_out_is_one_line(capsys):
    """It printed argparse's three-line usage block before the error."""
    with pytest.raises(SystemExit) as stop:
        tiny.main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "error: the following arguments are required: --out (--help lists the " \
        "options)\n"


def test_tiny_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--out", str(target)])
    assert exit_info.value.code == 2 and target.read_bytes() == b"mine"
    assert capsys.readouterr().err == f"error: --out {target} exists and is a file; choose a new folder\n"


def test_the_training_script_ends_a_late_error_in_one_line(tiny_sd15_dir, tmp_path):
    photos = make_photos(tmp_path / "photos")
    argv = [sys.executable, str(REPO / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(tiny_sd15_dir),
            "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks dog", "--rank", "64",
            "--output_dir", str(tmp_path / "out")]
    plain = subprocess.run(argv, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"error: {RANK_MESSAGE}"  # (--debug: see the test above)
    assert not (tmp_path / "out").exists()


# --- what the model's files tell, before loading ------------------------------------------------------------


def test_a_rank_larger_than_a_layer_is_refused_before_the_model_loads(tiny_sd15_dir, tmp_path, monkeypatch):
    forbid_model_load(monkeypatch)
    config = tiny_config(tiny_sd15_dir, make_photos(tmp_path / "photos"), tmp_path / "out", rank=64)
    with pytest.raises(ConfigError) as err:
        run_training(config)
    assert str(err.value) == RANK_MESSAGE and not (tmp_path / "out").exists()


def test_attaching_a_rank_too_large_changes_nothing(tiny_sd15_dir):
    """Python API: the check runs over every component before any layer is wrapped (it used to fail half-way)."""
    from diffusers import StableDiffusionPipeline

    from moslora_diffusion import AdapterConfig

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(AdapterError, match=r"rank 33 is larger than the width of UNet2DConditionModel's .*\(32\); "
                                           r"the largest rank these targets allow is 32"):
        attach_to_pipeline(pipe, AdapterConfig(rank=33), unet_targets="all", text_targets="attn")
    assert pipeline_adapters(pipe) == {}
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # not even frozen


def test_a_folder_missing_its_unet_names_the_folder_and_what_it_must_hold(broken_models, no_weights_read):
    no_unet, _ = broken_models
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(no_unet)
    assert str(err.value) == (
        f"{no_unet} has no unet/ folder: a diffusers Stable Diffusion 1.x folder holds model_index.json and one "
        "sub-folder per component (unet/, vae/, text_encoder/, tokenizer/, scheduler/), each with its config and, "
        "for the models, .safetensors weights; copy the whole folder, or pass a single .safetensors checkpoint "
        "instead")


def test_pickle_only_weights_are_refused_with_how_to_convert(broken_models, no_weights_read):
    _, bin_only = broken_models
    with pytest.raises(WeightFileError) as err:
        load_pipeline(bin_only)
    message = str(err.value)
    assert message.startswith(f"{bin_only / 'unet'} holds only pickle weights (diffusion_pytorch_model.bin), which "
                              "can run code when loaded; moslora-diffusion loads .safetensors only.")
    assert (f"DiffusionPipeline.from_pretrained('{bin_only}', use_safetensors=False).save_pretrained("
            f"'{bin_only}-safetensors', safe_serialization=True)") in message


def test_a_safety_checker_is_never_read(tiny_sd15_dir, tmp_path):
    """Old SD 1.x folders often keep the NSFW checker as .bin only: we drop it anyway, so it is not even opened."""
    import json

    model = shutil.copytree(tiny_sd15_dir, tmp_path / "with-checker")
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "config.json").write_text("{}")
    (model / "safety_checker" / "pytorch_model.bin").write_bytes(b"a pickle we must never open")
    index = json.loads((model / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], requires_safety_checker=True)
    (model / "model_index.json").write_text(json.dumps(index))
    assert load_pipeline(model).safety_checker is None


def test_generate_refuses_an_out_that_names_a_file_before_loading(tiny_sd15_dir, tmp_path, capsys, no_loading):
    target = tmp_path / "picture.png"
    target.write_bytes(b"my picture")
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--base", str(tiny_sd15_dir), "--prompt", "a dog", "--out", str(target)])
    assert exit_info.value.code == 2 and target.read_bytes() == b"my picture"
    assert capsys.readouterr().err == (f"error: --out {target} is a file; --out names the folder the images go to "
                                       "(created if missing): choose another name\n")
    with pytest.raises(SystemExit):
        generate.main(["--base", str(tiny_sd15_dir), "--prompt", "a dog", "--out", str(target / "sub")])
    assert f"--out {target / 'sub'} is under {target}, which is a file" in capsys.readouterr().err


def _help_of(main, argv: list[str], capsys) -> str:
    """What `--help` prints; the command must exit (or return) with status 0."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr().out
    assert status in (0, None) and out.startswith("usage: "), (argv, status, out)
    return out


@pytest.mark.parametrize("command, argv", [
    ("train_dreambooth.py", ["--help"]), ("app.py", ["--help"]), ("generate", ["--help"]), ("evaluate", ["--help"]),
    ("export", ["--help"]), ("tiny", ["--help"]), ("mole", ["--help"]), ("mole", ["-h"]), ("mole", ["train", "--help"]),
    ("mole", ["generate", "--help"]), ("mole", ["export", "--help"])])
def test_help_exits_0_everywhere(command, argv, capsys):
    from moslora_diffusion import evaluate
    from moslora_diffusion.mole.cli import main as mole_main

    mains = {"train_dreambooth.py": train_main, "app.py": app_cli.main, "generate": generate.main,
             "evaluate": evaluate.main, "export": export.main, "tiny": tiny.main, "mole": mole_main}
    out = _help_of(mains[command], argv, capsys)
    if argv == ["--help"] and command == "mole":
        assert all(f"  {name} " in out for name in ("train", "generate", "export"))


@pytest.mark.parametrize("module", ["generate", "evaluate"])
def test_generate_and_evaluate_help_name_the_command_and_show_defaults_and_samplers(module, capsys):
    from moslora_diffusion import evaluate

    out = " ".join(_help_of({"generate": generate.main, "evaluate": evaluate.main}[module], ["--help"],
                            capsys).split())  # argparse wraps lines
    assert out.startswith(f"usage: python -m moslora_diffusion.{module} ")
    assert "denoising steps (default: 25)" in out and "CFG scale (default: 7.5)" in out
    assert "one of: DPM++ 2M, Euler, Euler a, DDIM, PNDM (default: DPM++ 2M)" in out
    if module == "generate":
        assert "which go to <out>/<date>/ as mole generate's" in out


def test_an_unknown_sampler_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        generate.main(["--base", "b", "--prompt", "p", "--out", "o", "--sampler", "DPM++"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: argument --sampler: invalid choice: 'DPM++' (choose from ")


# --- a single-file base without its model configs ------------------------------------------------------------------

SINGLE_FILE_HINT = ("is a single file without its model configs here: pass --config DIR (--single_file_config DIR for "
                    "training), a diffusers model folder of the same family, e.g. the one it was exported from")


@pytest.fixture(scope="module")
def single_file_base(tiny_sd15_dir, tmp_path_factory):
    """The tiny SD 1.x pipeline as one .safetensors checkpoint (the layout merged-single-file writes)."""
    from safetensors.torch import save_file

    from moslora_diffusion.formats.single_file import single_file_state_dict

    pipe = load_pipeline(tiny_sd15_dir)
    tensors = single_file_state_dict("sd1", {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder})
    path = tmp_path_factory.mktemp("single-file") / "model.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def _hub(monkeypatch, tmp_path, cached=None, offline=False) -> list[bool]:
    """An empty hub cache (or `cached`, a folder, as the cached configs) and no network: a download fails as on an
    offline machine, and diffusers' own config download is refused. Returns local_files_only of each hub call."""
    import huggingface_hub
    from diffusers.loaders import single_file
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(single_file, "_download_diffusers_model_config_from_hub", _refuse)
    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only and cached is not None:
            return str(cached)
        raise LocalEntryNotFoundError(f"{repo_id}: not in the cache" + ("" if local_files_only else
                                                                      " (ConnectError: Name or service not known)"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable hub", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("command", ["train", "generate", "export"])
def test_a_single_file_base_without_its_configs_is_one_line_naming_the_config_flag(
        command, offline, single_file_base, tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    """It printed diffusers' "`local_files_only` is True but no local configs were found" paragraph, then a network
    error, and never named --config."""
    from conftest import make_adapter
    from diffusers import StableDiffusionPipeline

    monkeypatch.delenv("MOSLORA_DEBUG", raising=False)
    calls = _hub(monkeypatch, tmp_path, offline=offline)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", _refuse)
    base = str(single_file_base)
    adapter = make_adapter(tiny_sd15_dir, tmp_path / "run" / "moslora.safetensors")
    argv = {"train": ["--pretrained_model_name_or_path", base, "--instance_data_dir",
                      str(make_photos(tmp_path / "photos")), "--instance_prompt", "a photo of sks dog",
                      "--output_dir", str(tmp_path / "out"), "--report_to", "none"],
            "generate": ["--base", base, "--prompt", "a dog", "--out", str(tmp_path / "out")],
            "export": ["--base", base, "--adapter", str(adapter), "--to", "merged-single-file",
                       "--out", str(tmp_path / "out" / "merged.safetensors")]}[command]
    main = {"train": train_main, "generate": generate.main, "export": export.main}[command]
    capsys.readouterr()  # the progress bars of building the adapter
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        reset_accelerate()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    why = (f"offline: {repo}'s configs are not cached" if offline else
           f"{repo}'s configs are not cached and could not be downloaded: LocalEntryNotFoundError")
    assert err == f"error: {base} {SINGLE_FILE_HINT} ({why})\n"
    assert calls == ([True] if offline else [True, False])  # the cache first; the network only when not offline
    assert not (tmp_path / "out" / "merged.safetensors").exists() and not list((tmp_path / "out").rglob("*.png"))


def test_a_single_file_base_uses_cached_configs_and_a_given_config_as_before(single_file_base, tiny_sd15_dir,
                                                                             tmp_path, monkeypatch):
    """Cached configs load without --config and without the network; with --config the hub is never asked."""
    calls = _hub(monkeypatch, tmp_path, cached=tiny_sd15_dir)
    pipe = load_pipeline(single_file_base)
    assert calls == [True] and pipe.unet.config.sample_size == load_pipeline(tiny_sd15_dir).unet.config.sample_size
    calls.clear()
    with_config = load_pipeline(single_file_base, config=tiny_sd15_dir)
    assert calls == [] and type(with_config).__name__ == "StableDiffusionPipeline"


def test_a_pickle_file_gets_the_same_line_from_every_command(tmp_path, capsys):
    """A .ckpt was refused in three wordings (as --base, as an adapter, as a MoLE expert): one now, naming the
    file, why (pickles run code when loaded) and what to do; nothing is opened (the file is not a pickle at all)."""
    from moslora_diffusion.composition.cli import main as mole_main

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"never opened")
    expected = (f"{ckpt}: only .safetensors files are accepted; pickle files (.ckpt) can run code when loaded: "
                "convert it to .safetensors first")
    commands = [(generate.main, ["--base", str(ckpt), "--prompt", "p", "--out", str(tmp_path / "a")]),
                (generate.main, ["--base", str(tmp_path), "--adapter", str(ckpt), "--prompt", "p",
                                 "--out", str(tmp_path / "b")]),
                (mole_main, ["generate", "--base", str(tmp_path), "--experts", str(ckpt), str(ckpt), "--method",
                             "sum", "--prompt", "p", "--out", str(tmp_path / "c")])]
    for command, argv in commands:
        with pytest.raises(SystemExit) as stop:
            command(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and expected in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
