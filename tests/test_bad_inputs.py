"""One table of bad inputs walked through every entry point: the train command, MoLE gate training, evaluate,
generate, export, app.py, the app's request functions and the Python API. Each must end in one line naming the problem
(commands: `error: ...` on stderr and exit status 2; the app and the API: their ValueError subclass), before any
model is loaded, with the output folder left exactly as it was."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from app_helpers import tiny_app_state
from conftest import make_adapter, randomize_adapters
from training_helpers import PROMPT, make_photos

import moslora_diffusion.app.state as app_state
import moslora_diffusion.evaluation.cli as evaluate_cli
import moslora_diffusion.formats.export_targets as export_targets
import moslora_diffusion.generate as generate_command
import moslora_diffusion.mole.cli as mole_cli
import moslora_diffusion.mole.gate_training as gate_training
import moslora_diffusion.training.trainer.loop as loop
from moslora_diffusion import (
    AdapterConfig,
    attach_to_pipeline,
    load_adapter,
    pipeline_adapters,
    save_adapter,
    set_pipeline_scale,
)
from moslora_diffusion.app.cli import main as app_main
from moslora_diffusion.app.exporting import export_adapters
from moslora_diffusion.app.training_jobs import TrainingJob
from moslora_diffusion.app.ui import build_ui
from moslora_diffusion.checks import SCALE_MAX, SCALE_MIN
from moslora_diffusion.evaluate import main as evaluate_main
from moslora_diffusion.export import main as export_main
from moslora_diffusion.formats.export_targets import export
from moslora_diffusion.formats.merge import bake_adapters
from moslora_diffusion.generation.text_to_image import GenerationRequest
from moslora_diffusion.models.loading import load_pipeline
from moslora_diffusion.mole.cli import main as mole_main
from moslora_diffusion.training import TrainConfig
from moslora_diffusion.training import main as train_main
from moslora_diffusion.training.run_folder.checkpoints import save_checkpoint

INF, NAN = float("inf"), float("nan")


@pytest.fixture(scope="module")
def w(tiny_sd15_dir, tmp_path_factory):
    """Everything the cases use: a training output folder, photos, a user's output folder, the app, a pipeline."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run = make_adapter(tiny_sd15_dir, root / "run" / "moslora.safetensors", seed=1).parent
    out = root / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own file")
    (out / "earlier" / "00000-1-adapted.png").write_bytes(b"an image of an earlier run")
    (root / "nan.yaml").write_text("learning_rate: .nan\n")
    torch_state = {"adapter": {"unet.x.A": torch.ones(2)}}
    save_checkpoint(root / "db-run", 5, {"family": "sd1", "adapter": {"rank": 4}}, torch_state, {})  # step 5
    save_checkpoint(root / "gate-run", 2, {"family": "sd1", "experts": ["0" * 64]}, {"gates": {"b": torch.ones(2)}},
                    {})
    app, given = tiny_app_state(tiny_sd15_dir, tmp_path_factory)
    app.load_adapter(make_adapter(tiny_sd15_dir, given / "dog" / "moslora.safetensors", seed=2))
    cat = make_adapter(tiny_sd15_dir, given / "cat" / "moslora.safetensors", seed=3)
    pipe = load_pipeline(tiny_sd15_dir)
    attach_to_pipeline(pipe, AdapterConfig(rank=4, alpha=8), text_targets="attn")
    randomize_adapters(pipe)
    base = str(tiny_sd15_dir)
    train = ["--pretrained_model_name_or_path", base, "--instance_data_dir", str(make_photos(root / "photos")),
             "--instance_prompt", PROMPT, "--output_dir", str(out), "--report_to", "none"]
    generate = ["--base", base, "--adapter", str(run), "--prompt", PROMPT, "--out", str(out)]
    export = ["--base", base, "--to", "lora-kohya", "--out", str(out / "x.safetensors")]
    evaluate = ["--base", base, "--adapter", str(run), "--photos", str(root / "photos"), "--prompt", PROMPT, "--out",
                str(out)]
    fresh = train + ["--output_dir", str(root / "fresh-run")]  # a new run folder: the resume checks come next
    photos = str(root / "photos")
    gates = ["train", "--pretrained_model_name_or_path", base, "--experts", str(run), str(cat), "--expert_data_dirs",
             photos, photos, "--expert_prompts", PROMPT, PROMPT, "--output_dir", str(out)]
    return types.SimpleNamespace(root=root, run=run, out=out, app=app, cat=cat, pipe=pipe, base=base, train=train,
                                 fresh=fresh, generate=generate, export=export, gates=gates,
                                 evaluate=evaluate, mole=root / "gates" / "mole.safetensors")


def _full_disk(call):
    """call() with 2 MiB free on every disk: less than the 64 MiB margin every write keeps free."""
    usage = types.SimpleNamespace(total=2**40, used=2**40 - 2**21, free=2**21)
    with mock.patch.object(shutil, "disk_usage", lambda path: usage):
        return call()


def _without(package: str, call):
    """call() as on a machine without `package` installed."""
    real = importlib.util.find_spec
    with mock.patch.object(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)):
        return call()


def _without_cuda(call):
    """call() as on a machine without a CUDA GPU (this one, and most CI machines)."""
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        return call()


def _port_taken(call_with_port):
    """call_with_port(port) while another program listens on that port of 127.0.0.1."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        return call_with_port(other.getsockname()[1])


def _request(**change) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, **change})


def _nan_adapter_file(w):
    layer = next(iter(pipeline_adapters(w.pipe)["unet"].values()))
    saved = layer.lora_B.detach().clone()
    layer.lora_B.data[0, 0] = NAN
    try:
        save_adapter(w.pipe, w.out / "moslora.safetensors")
    finally:
        layer.lora_B.data.copy_(saved)


def _case(entry, call, message, folder="out"):
    return pytest.param(entry, call, message, folder, id=f"{entry}: {message[:60]}")


CASES = [
    # python train_dreambooth.py: what a first user tried (resume targets, huge or empty values)
    _case("train", lambda w: train_main(w.train + ["--max_train_steps", "99999999999999999999"]),
          "--max_train_steps must be"),
    _case("train", lambda w: train_main(w.train + ["--instance_data_dir", ""]), "--instance_data_dir is"),
    _case("train", lambda w: train_main(w.fresh + ["--resume_from_checkpoint", str(w.run / "moslora.safetensors")]),
          "is a file, not a checkpoint"),
    _case("train", lambda w: train_main(w.fresh + ["--resume_from_checkpoint", str(w.root / "db-run")]),
          "is a run folder, not a checkpoint: give"),
    _case("train", lambda w: train_main(w.fresh + ["--max_train_steps", "2", "--resume_from_checkpoint",
                                                   str(w.root / "db-run" / "checkpoint-5")]),
          "is at step 5, past --max_train_steps 2"),
    _case("train", lambda w: train_main(w.fresh + ["--resume_from_checkpoint",
                                                   str(w.root / "gate-run" / "checkpoint-2")]),
          "holds MoLE gates (python -m moslora_diffusion.mole train), not DreamBooth adapters"),
    _case("train", lambda w: train_main(w.train + ["--learning_rate", "inf"]),
          "--learning_rate must be a finite number > 0, got inf"),
    _case("train", lambda w: train_main(w.train + ["--learning_rate", "nan"]), "--learning_rate must be a finite"),
    _case("train", lambda w: train_main(w.train + ["--learning_rate=-1e-4"]), "--learning_rate must be > 0"),
    _case("train", lambda w: train_main(w.train + ["--text_encoder_lr", "inf"]), "--text_encoder_lr must be a finite"),
    _case("train", lambda w: train_main(w.train + ["--max_grad_norm", "nan"]),
          "--max_grad_norm must be a finite number >= 0, got nan"),
    _case("train", lambda w: train_main(w.train + ["--prior_loss_weight", "inf"]), "--prior_loss_weight must be a fin"),
    _case("train", lambda w: train_main(w.train + ["--snr_gamma=-inf"]), "--snr_gamma must be a finite number"),
    _case("train", lambda w: train_main(w.train + ["--noise_offset", "nan"]), "--noise_offset must be a finite"),
    _case("train", lambda w: train_main(w.train + ["--adam_beta2", "1.5"]), "--adam_beta2 must be in [0, 1)"),
    _case("train", lambda w: train_main(w.train + ["--ema_decay", "inf"]), "--ema_decay must be a finite number"),
    _case("train", lambda w: train_main(w.train + ["--seed", "-1"]), "--seed must be between 0 and 4294967295"),
    _case("train", lambda w: train_main(w.train + ["--rank", "0"]), "--rank must be > 0, got 0"),
    _case("train", lambda w: train_main(w.train + ["--rank", "four"]), "argument --rank: invalid int value: 'four'"),
    _case("train", lambda w: train_main(w.train + ["--resolution", "500"]), "--resolution must be a multiple of 8"),
    _case("train", lambda w: train_main(w.train + ["--config", str(w.root / "nan.yaml")]),
          "--learning_rate must be a finite number > 0, got nan"),
    # a tracker whose package is missing: both trainers refuse it alike (issue 28, item 1)
    _case("train", lambda w: _without("wandb", lambda: train_main(w.train + ["--report_to", "wandb"])),
          "--report_to wandb needs the wandb package, which is not installed: pip install wandb"),
    _case("mole", lambda w: _without("wandb", lambda: mole_main(w.gates + ["--report_to", "wandb"])),
          "--report_to wandb needs the wandb package, which is not installed: pip install wandb"),
    # a kohya sd-scripts flag name: "did you mean" ours (issue 28, item 19)
    _case("train", lambda w: train_main(w.train + ["--network_dim", "8"]),
          "unrecognized arguments: --network_dim 8; --network_dim: did you mean --rank?"),
    _case("train", lambda w: train_main(w.train + ["--network_alpha=4"]),
          "--network_alpha: did you mean --lora_alpha?"),
    _case("train", lambda w: train_main(w.train + ["--train_data_dir", "x"]),
          "--train_data_dir: did you mean --instance_data_dir?"),
    _case("train", lambda w: train_main(w.train + ["--learnig_rate", "1e-4"]),
          "--learnig_rate: did you mean --learning_rate?"),
    # every word of the typo in one flag wins over a closer spelling (it said "did you mean --max_timestep?")
    _case("train", lambda w: train_main(w.train + ["--max_steps", "2"]),
          "unrecognized arguments: --max_steps 2; --max_steps: did you mean --max_train_steps?"),
    # the toy scorer reads 64x64 images only: refused before the images are made (issue 28, item 2)
    _case("train", lambda w: train_main(w.train + ["--validation_metrics", "toy", "--validation_prompt", PROMPT,
                                                   "--resolution", "128"]),
          "--validation_metrics toy: the toy scorer reads the toy world's 64x64 images, got --resolution 128: use"),
    _case("evaluate", lambda w: evaluate_main(w.evaluate + ["--metrics", "toy", "--size", "128"]),
          "the toy scorer reads the toy world's 64x64 images, got --size 128: use --size 64"),
    # a full disk: the margin named, refused before the model loads, no empty output folder left (issue 28, item 6)
    _case("generate", lambda w: _full_disk(lambda: generate_command.main(w.generate + ["--out", str(w.out / "new")])),
          "MiB free, and writing there needs 0 MiB plus 64 MiB kept free (so the disk never fills up); free some"),
    _case("evaluate", lambda w: _full_disk(lambda: evaluate_main(w.evaluate + ["--out", str(w.out / "new")])),
          "2 MiB free, and writing there needs 0 MiB plus 64 MiB kept free"),
    _case("export", lambda w: _full_disk(lambda: export_main(w.export + ["--adapter", str(w.run), "--out",
                                                                         str(w.out / "new" / "x.safetensors")])),
          "2 MiB free, and writing there needs 0 MiB plus 64 MiB kept free"),
    # (--mole names a MoLE file the disk check comes before; a DreamBooth folder there is now refused at once)
    _case("mole", lambda w: _full_disk(lambda: mole_main(["generate", "--base", w.base, "--mole", str(w.mole),
                                                          "--prompt", PROMPT, "--out", str(w.out / "new")])),
          "2 MiB free, and writing there needs 0 MiB plus 64 MiB kept free"),
    _case("mole", lambda w: _full_disk(lambda: mole_main(["export", "--base", w.base, "--mole", str(w.mole), "--to",
                                                          "lora-kohya", "--out", str(w.out / "new.safetensors")])),
          "2 MiB free, and writing there needs 0 MiB plus 64 MiB kept free"),
    # python app.py: the port's range with the other numbers (issue 28, item 5)
    _case("app.py", lambda w: app_main(["--base", w.base, "--output_dir", str(w.out), "--port", "99999"]),
          "--port must be between 1 and 65535, got 99999"),
    _case("app.py", lambda w: app_main(["--base", w.base, "--output_dir", str(w.out), "--port", "0"]),
          "--port must be between 1 and 65535, got 0"),
    # a GPU this machine lacks, a device torch does not know, a port in use: each failed after the model loaded
    # ("Torch not compiled with CUDA enabled", "Cannot find empty port ... GRADIO_SERVER_PORT")
    _case("app.py", lambda w: _without_cuda(lambda: app_main(["--base", w.base, "--output_dir", str(w.out),
                                                                "--device", "cuda"])),
          "--device cuda: this machine has no CUDA GPU that torch can use; leave --device out or give cpu"),
    _case("app.py", lambda w: app_main(["--base", w.base, "--output_dir", str(w.out), "--device", "tpu"]),
          "--device 'tpu' is not a device: give cpu, cuda, cuda:N or mps"),
    _case("app.py", lambda w: _port_taken(lambda port: app_main(["--base", w.base, "--output_dir", str(w.out),
                                                                 "--port", str(port)])),
          "on 127.0.0.1 is not free (Address already in use): another program serves there; choose another --port"),
    _case("evaluate", lambda w: _without_cuda(lambda: evaluate_main(w.evaluate + ["--device", "cuda:1"])),
          "--device cuda:1: this machine has no CUDA GPU that torch can use"),
    # python -m moslora_diffusion.generate
    _case("generate", lambda w: generate_command.main(w.generate + ["--guidance", "nan"]),
          "--guidance must be a finite number between 0 and 30, got nan"),  # the flag, not the app's label
    _case("generate", lambda w: generate_command.main(w.generate + ["--guidance", "31"]),
          "--guidance must be between 0 and 30"),
    _case("generate", lambda w: generate_command.main(w.generate + ["--steps", "0"]),
          "--steps must be between 1 and 150"),
    _case("generate", lambda w: generate_command.main(w.generate + ["--steps", "ten"]), "invalid int value: 'ten'"),
    _case("generate", lambda w: generate_command.main(w.generate + ["--size", "100"]),
          "--size must be a multiple of 8 between 64 and 2048, got 100"),  # once: it said width, then height
    _case("generate", lambda w: generate_command.main(w.generate + ["--seeds", "-2"]),
          "--seeds: seed must be between -1 and"),
    _case("generate", lambda w: generate_command.main(w.generate + ["--adapter", f"{w.run}:5"]),
          "the scale must be between -1 and 2, got '5'"),
    _case("generate", lambda w: generate_command.main(w.generate + ["--adapter", f"{w.run}:inf"]),
          "the scale must be a finite number between -1 and 2, got inf"),
    # python -m moslora_diffusion.export
    _case("export", lambda w: export_main(w.export + ["--adapter", f"{w.run}:nan"]), "the scale must be a finite"),
    _case("export", lambda w: export_main(w.export + ["--adapter", f"{w.run}:3"]),
          "the scale must be between -1 and 2"),
    _case("export", lambda w: export_main(w.export + ["--adapter", f"{w.run}:-1.5"]), "must be between -1 and 2"),
    _case("export", lambda w: export_main(w.export + ["--adapter", str(w.run), "--dtype", "fp8"]),
          "argument --dtype: invalid choice: 'fp8'"),
    # the app's request functions (what its UI and HTTP API call)
    _case("app", lambda w: w.app.generate(_request(guidance=INF)), "guidance (CFG scale) must be a finite", "app"),
    _case("app", lambda w: w.app.generate(_request(steps=NAN)), "steps must be a finite number between 1 and 150",
          "app"),
    _case("app", lambda w: w.app.generate(_request(width=INF)), "width must be a finite number", "app"),
    _case("app", lambda w: w.app.generate(_request(scales={"dog": 5.0})), "scale of 'dog' must be between -1 and 2",
          "app"),
    _case("app", lambda w: w.app.generate(_request(scales={"dog": NAN})), "scale of 'dog' must be a finite", "app"),
    _case("app", lambda w: w.app.load_adapter(w.cat, scale=NAN), "scale of 'cat' must be a finite number", "app"),
    _case("app", lambda w: export_adapters(w.app, "lora-kohya", {"dog": INF}), "scale of 'dog' must be a finite",
          "app"),
    _case("app", lambda w: export_adapters(w.app, "lora-kohya", {"dog": 2.5}), "scale of 'dog' must be between -1",
          "app"),
    _case("app", lambda w: w.app.start_training(PROMPT, steps=INF), "steps must be a finite number between 1 and",
          "app"),
    _case("app", lambda w: w.app.start_training(PROMPT, rank=NAN), "rank must be a finite number between 1 and 256",
          "app"),
    _case("app", lambda w: w.app.start_training(PROMPT, steps="many"), "steps must be a whole number, got 'many'",
          "app"),
    _case("app", lambda w: w.app.start_training(PROMPT, resolution=100), "resolution must be a multiple of 8",
          "app"),
    # a load request naming nothing (the HTTP API's /load_mole without name or path) (issue 28, item 10)
    _case("app", lambda w: w.app.compose.load_available(None), "choose a MoLE file from the list, or give a path",
          "app"),
    _case("app", lambda w: w.app.compose.load_available(" "), "choose a MoLE file from the list", "app"),
    _case("app", lambda w: w.app.load_available(None), "choose an adapter to load; in the app's folders: ", "app"),
    # the Python API
    _case("api", lambda w: AdapterConfig(rank=0), "rank must be > 0, got 0"),
    _case("api", lambda w: AdapterConfig(alpha=INF), "alpha must be a finite number > 0, got inf"),
    _case("api", lambda w: AdapterConfig(dropout=NAN), "dropout must be a finite number in [0, 1)"),
    _case("api", lambda w: set_pipeline_scale(w.pipe, 3.0), "adapter scale must be between -1 and 2, got 3.0"),
    _case("api", lambda w: set_pipeline_scale(w.pipe, NAN), "adapter scale must be a finite number"),
    _case("api", lambda w: load_adapter(w.pipe, w.run / "moslora.safetensors", scale=INF),
          "adapter scale must be a finite number"),
    _case("api", lambda w: w.app.fusion.set_scales({"dog": -2.0}), "scale of 'dog' must be between -1 and 2"),
    _case("api", lambda w: TrainConfig(pretrained_model_name_or_path=w.base, instance_data_dir="d",
                                       instance_prompt=PROMPT, output_dir=str(w.out), learning_rate=INF),
          "--learning_rate must be a finite number > 0, got inf"),
    _case("api", lambda w: export(w.base, [(w.run, NAN)], "lora-kohya", w.out / "x.safetensors"),
          "must be a finite number between -1 and 2"),
    # every scale checked before the first adapter is baked in for good (the message says which check spoke)
    _case("api", lambda w: bake_adapters(w.app.pipe, [(w.run, 1.0), (w.run, 5.0)]),
          "' must be between -1 and 2, got 5.0"),  # set_scale would say 'adapter scale must be'
    _case("api", _nan_adapter_file, "moslora_B holds NaN or inf values"),
]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too) with its content hash: to show nothing was added or changed."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _no_model_load(*args, **kwargs):
    raise AssertionError("a model was loaded: the bad input was not caught before loading")


@pytest.mark.parametrize("entry, call, message, folder", CASES)
def test_bad_input_is_one_line_before_loading_and_leaves_the_output_folder_alone(w, monkeypatch, capsys, entry, call,
                                                                                 message, folder):
    for module, name in ((loop, "load_base"), (gate_training, "load_base"), (generate_command, "open_app_state"),
                         (export_targets, "load_pipeline"), (evaluate_cli, "_load_pipeline"),
                         (mole_cli, "_load"), (app_state, "open_app_state")):
        monkeypatch.setattr(module, name, _no_model_load)
    monkeypatch.setattr(TrainingJob, "start", _no_model_load)  # no trainer process may start either
    watched = w.app.outputs if folder == "app" else w.out
    before, scales = _tree(watched), dict(w.app.fusion.scales)
    capsys.readouterr()
    if entry in ("train", "mole", "evaluate", "generate", "export", "app.py"):
        text = _one_error_line(lambda: call(w), capsys)
    else:
        with pytest.raises(ValueError) as raised:  # every error type of the app and the API is a ValueError
            call(w)
        text = str(raised.value)
        assert "\n" not in text
        if entry == "app":
            assert type(raised.value) is not ValueError  # the app's own error types, which its UI shows as messages
    assert message in text
    assert _tree(watched) == before
    assert w.app.fusion.scales == scales and w.app.training.job is None


def _one_error_line(call, capsys) -> str:
    """The one `error: ...` line a command printed on stderr, exit status 2, no traceback."""
    try:
        status = call()
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_app_slider_has_the_range_the_commands_accept(w):
    sliders = [b for b in build_ui(w.app).blocks.values() if getattr(b, "elem_id", None) == "scale-0"]
    assert [(s.minimum, s.maximum) for s in sliders] == [(SCALE_MIN, SCALE_MAX)] == [(-1.0, 2.0)]


# --- class images, resolution: what a new user's `python train_dreambooth.py` ran into -----------------------------

PRIOR = ["--with_prior_preservation", "--class_prompt", "a photo of a dog"]


def _train_refused(w, monkeypatch, capsys, extra: list[str]) -> str:
    """The one `error: ...` line of a training command (a new run folder, --output_dir w.root / fresh-run) that
    must stop before the model loads; the folder is then still absent."""
    monkeypatch.setattr(loop, "load_base", _no_model_load)
    capsys.readouterr()
    line = _one_error_line(lambda: train_main(w.fresh + extra), capsys)
    assert not (w.root / "fresh-run").exists()
    return line


@pytest.mark.parametrize("spelling", ["same", "trailing slash", "relative", "dot-dot", "inside", "inside, relative"])
def test_a_class_folder_in_the_photo_folder_is_refused_before_a_class_image_is_written(w, monkeypatch, capsys,
                                                                                     spelling):
    """--class_data_dir = --instance_data_dir generated class_00000_0.png... among the user's photos, which the next
    run trained on as the subject: refused under any spelling of the path, and for a folder inside it."""
    photos = w.root / "photos"
    monkeypatch.chdir(w.root)
    given = {"same": str(photos), "trailing slash": f"{photos}/", "relative": "photos",
             "dot-dot": str(photos / ".." / "photos"), "inside": str(photos / "class"),
             "inside, relative": "./photos/class/"}[spelling]
    before = _tree(photos), _tree(w.out)
    text = _train_refused(w, monkeypatch, capsys, PRIOR + ["--class_data_dir", given])
    if spelling.startswith("inside"):
        assert text == (f"error: --class_data_dir {given} lies inside the instance photo folder {photos}: generated "
                        "class images would land among your photos; give a folder of its own, outside it")
    else:
        assert text == (f"error: --class_data_dir is the instance photo folder ({photos}): generated class images "
                        "would land among your photos; give a folder of its own")
    assert (_tree(photos), _tree(w.out)) == before  # no class image, no class folder, nothing in the user's folder


def test_a_class_folder_beside_the_photos_or_unused_is_accepted(w, capsys):
    """The check refuses only where class images would be written among the photos."""
    from moslora_diffusion.training.settings.config import parse_args

    beside = parse_args(w.train + PRIOR + ["--class_data_dir", str(w.root / "photos-class")])
    assert beside.class_data_dir == str(w.root / "photos-class")  # a sibling whose name starts the same: fine
    photos = str(w.root / "photos")
    assert parse_args(w.train + PRIOR + ["--class_data_dir", photos, "--prior_source", "base_model"]).class_data_dir
    assert parse_args(w.train + ["--class_data_dir", photos]).class_data_dir == photos  # no prior preservation
    assert "--class_data_dir has no effect in this run" in capsys.readouterr().out
    assert not (w.root / "photos-class").exists()


@pytest.mark.parametrize("under", [False, True])
def test_a_class_folder_that_is_a_file_is_refused_before_loading(w, monkeypatch, capsys, tmp_path, under):
    """A file as --class_data_dir failed only after the model loaded, with a raw `[Errno 17] File exists`."""
    file = tmp_path / "classes.png"
    file.write_bytes(b"not a folder")
    given = str(file / "dog") if under else str(file)
    text = _train_refused(w, monkeypatch, capsys, PRIOR + ["--class_data_dir", given])
    where = f" lies under {file}, which" if under else ""
    assert text == (f"error: --class_data_dir {given}{where} is a file, not a folder: give a folder for the class "
                    "images (missing ones are generated there)")
    assert [p.name for p in tmp_path.iterdir()] == ["classes.png"] and file.read_bytes() == b"not a folder"


@pytest.mark.parametrize("resolution", ["1000000", "4104", "0"])
def test_a_resolution_past_the_maximum_is_refused_before_loading(w, monkeypatch, capsys, resolution):
    """--resolution 1000000 started, was killed for memory a minute later and left an empty run folder."""
    before = _tree(w.out)
    text = _train_refused(w, monkeypatch, capsys, ["--resolution", resolution])
    assert text == f"error: --resolution must be a multiple of 8 between 8 and 4096, got {resolution}"
    assert _tree(w.out) == before


def test_the_largest_resolution_is_accepted():
    assert TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt=PROMPT,
                       resolution=4096).resolution == 4096


# --- counts without a ceiling, a logging folder that is a file, a mistyped flag: a new user's runs ----------------


@pytest.mark.parametrize(("flags", "message"), [
    # ran out of memory after training, losing the run
    (["--num_validation_images", "100000"], "--num_validation_images must be between 1 and 64, got 100000"),
    # trained, then diffusers said "cannot be larger than train_timesteps", losing the trained steps
    (["--validation_inference_steps", "1000000"],
     "--validation_inference_steps must be between 1 and 150, got 1000000"),
    (["--class_inference_steps", "151"], "--class_inference_steps must be between 1 and 150, got 151"),
    (["--validation_inference_steps", "0"], "--validation_inference_steps must be between 1 and 150, got 0"),
    # accepted, with an ETA of 29,000 hours of class images
    (PRIOR + ["--num_class_images", "100000000"], "--num_class_images must be between 1 and 10000, got 100000000"),
])
def test_a_count_past_its_ceiling_is_refused_before_loading(w, monkeypatch, capsys, flags, message):
    before = _tree(w.out)
    assert _train_refused(w, monkeypatch, capsys, flags) == f"error: {message}"
    assert _tree(w.out) == before


def test_the_largest_counts_are_accepted():
    config = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt=PROMPT,
                         num_validation_images=64, validation_inference_steps=150, class_inference_steps=150,
                         num_class_images=10000)
    assert (config.num_validation_images, config.validation_inference_steps, config.num_class_images) == (64, 150,
                                                                                                          10000)


def test_denoising_steps_have_the_generate_commands_limit():
    """One limit of denoising steps for the generate command and the trainer's validation and class images."""
    from moslora_diffusion.generation.text_to_image import MAX_STEPS, REQUEST_RANGES
    from moslora_diffusion.training.settings.config import NUMBER_RANGES

    limits = {(r.lower, r.upper) for r in (REQUEST_RANGES["steps"], NUMBER_RANGES["validation_inference_steps"],
                                           NUMBER_RANGES["class_inference_steps"])}
    assert limits == {(1, MAX_STEPS)}


@pytest.mark.parametrize("under", [False, True])
def test_a_logging_folder_that_is_a_file_is_refused_before_loading(w, monkeypatch, capsys, tmp_path, under):
    """A file as --logging_dir loaded the model, then said `[Errno 20] Not a directory: '.../text.txt/moslora-
    dreambooth'`."""
    file = tmp_path / "text.txt"
    file.write_text("the user's notes")
    given = str(file / "tb") if under else str(file)
    text = _train_refused(w, monkeypatch, capsys, ["--report_to", "tensorboard", "--logging_dir", given])
    where = f"cannot be created: {file} is a file" if under else "is a file"
    assert text == (f"error: --logging_dir {given} {where}, not a folder; choose another --logging_dir for the "
                    "tensorboard logs, or pass --report_to none")
    assert [p.name for p in tmp_path.iterdir()] == ["text.txt"] and file.read_text() == "the user's notes"


def test_a_logging_folder_that_is_a_file_is_no_obstacle_without_a_tracker(w, tmp_path):
    from moslora_diffusion.training.run_folder.output_location import check_logging_dir

    file = tmp_path / "text.txt"
    file.write_text("the user's notes")
    config = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt=PROMPT,
                         output_dir=str(tmp_path / "out"), logging_dir=str(file), report_to="none")
    check_logging_dir(config)  # nothing is written there: no error


@pytest.mark.parametrize(("typo", "meant"), [
    ("--max_steps", "--max_train_steps"),  # not --max_timestep, the closer spelling
    ("--max-train-steps", "--max_train_steps"),
    ("--learnig_rate", "--learning_rate"),  # no flag holds the misspelt word: the closest spelling
    ("--validation_images", "--num_validation_images"),
    ("--prompt", None),  # three flags hold the word: no guess
    ("--network_dim", "--rank"),  # kohya's name
])
def test_a_mistyped_flag_suggests_the_flag_holding_its_words(w, capsys, typo, meant):
    line = _one_error_line(lambda: train_main(w.train + [typo, "2"]), capsys)
    hint = f"; {typo}: did you mean {meant}?" if meant else ""
    assert line == f"error: unrecognized arguments: {typo} 2{hint} (--help lists the options)"


def test_a_mistyped_setting_in_a_config_file_suggests_the_setting_holding_its_words(tmp_path):
    from moslora_diffusion.training.settings.config import parse_args
    from moslora_diffusion.training.settings.flags import ConfigError

    (tmp_path / "run.yaml").write_text("max_steps: 2\n")
    with pytest.raises(ConfigError) as raised:
        parse_args(["--config", str(tmp_path / "run.yaml")])
    assert str(raised.value) == f"--config {tmp_path / 'run.yaml'}: unknown setting 'max_steps' (did you mean " \
                                "'max_train_steps'?)"


# --- --config that is not a settings file, --region given a mask picture ------------------------------------------


@pytest.mark.parametrize("kind", ["picture", "folder"])
def test_a_config_that_is_a_picture_or_a_folder_says_what_to_give(w, monkeypatch, capsys, tmp_path, kind):
    """A PNG as --config said `'utf-8' codec can't decode byte 0x89`, naming neither the flag nor the file; a folder
    said `no such file` though it is there."""
    given = tmp_path / ("photo.png" if kind == "picture" else "settings")
    if kind == "picture":
        given.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    else:
        given.mkdir()
    text = _train_refused(w, monkeypatch, capsys, ["--config", str(given)])
    assert text == {"picture": f"error: --config {given} is not a YAML/TOML/JSON settings file (it is not text)",
                    "folder": f"error: --config {given} is a folder; give the settings file (.yaml, .toml or .json)"
                    }[kind]


def test_a_runs_own_record_as_config_says_how_to_continue_or_reuse_it(w, monkeypatch, capsys, tmp_path):
    """A run folder's training_config.json as --config said "unknown setting 'config'"."""
    import json

    record = tmp_path / "training_config.json"
    record.write_text(json.dumps({"moslora_diffusion_version": "0.1", "config": {"rank": 4}, "plan": {}}))
    text = _train_refused(w, monkeypatch, capsys, ["--config", str(record)])
    assert text.startswith(f"error: --config {record} is a training run's record, not a settings file: to continue "
                           "that run pass --output_dir <its folder> --resume_from_checkpoint latest")


@pytest.mark.parametrize("value", ["mask.png", "MASK.JPG", "existing file", "left"])
def test_a_mask_picture_given_to_region_points_to_region_mask(w, monkeypatch, capsys, tmp_path, value):
    """`--region dog=mask.png` said only "a box is 4 numbers"; a value that names a picture (an image suffix, or a
    file that is there) now also says to use --region_mask. A word that is neither keeps the plain message."""
    import moslora_diffusion.composition.cli as composition_cli
    import moslora_diffusion.models.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", _no_model_load)
    if value == "existing file":
        value = str(tmp_path / "dog-mask")
        Path(value).write_bytes(b"a mask without a suffix")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        composition_cli.main(["generate", "--base", w.base, "--experts", str(w.run), str(w.cat), "--prompt", PROMPT,
                              "--method", "regional", "--region", f"dog={value}", "--out", str(w.out)])
    err = capsys.readouterr().err
    hint = "" if value == "left" else f" (for a mask picture use --region_mask dog={value})"
    assert exit_info.value.code == 2 and err == f"error: --region dog={value}: a box is 4 numbers x0,y0,x1,y1{hint}\n"
