"""MoLE gate training (`python -m moslora_diffusion.mole train`), generation and static export from the command
line: only the gates learn, the file is self-contained, a killed run resumes bit for bit, bad input is one line."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_adapter
from diffusers import DiffusionPipeline
from mole_helpers import EXPERT_SPECS, encode, latents, make_experts
from PIL import Image
from training_helpers import REPO, cli_env, make_photos, reset_accelerate, wait_for

from moslora_diffusion.files.safetensors_io import load_tensors
from moslora_diffusion.formats.lora_files import read_lora_file
from moslora_diffusion.mole import attach_mole, load_experts, read_mole
from moslora_diffusion.mole.cli import main as mole_main
from moslora_diffusion.mole.gate_config import GateTrainConfig
from moslora_diffusion.mole.gate_training import GateTrainable, train_gates
from moslora_diffusion.training.run_folder.checkpoints import find_resume_checkpoint

EXPERTS = ("dog", "cat")


def _config(model: Path, experts: dict, photos: dict, out: Path, **overrides) -> GateTrainConfig:
    settings = dict(pretrained_model_name_or_path=str(model), experts=tuple(str(experts[n]) for n in EXPERTS),
                    expert_data_dirs=tuple(str(photos[n]) for n in EXPERTS),
                    expert_prompts=("a photo of sks dog", "a photo of zwx cat"), output_dir=str(out), resolution=32,
                    max_train_steps=3, learning_rate=5e-2, report_to="none", checkpointing_steps=1000,
                    logging_steps=1, validation_inference_steps=2)
    settings.update(overrides)
    return GateTrainConfig(**settings)


def _argv(config: GateTrainConfig) -> list[str]:
    """The command line of a GateTrainConfig: the settings that differ from the defaults."""
    default = GateTrainConfig(pretrained_model_name_or_path="m", experts=("a", "b"))
    argv = ["train"]
    for key, value in config.to_dict().items():
        if value == getattr(default, key) and key not in ("pretrained_model_name_or_path", "experts"):
            continue
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, tuple):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mole-train")
    experts = make_experts(tiny_sd15_dir, root / "experts", names=EXPERTS)
    photos = {name: make_photos(root / f"photos-{name}", count=2, seed=10 * i) for i, name in enumerate(EXPERTS)}
    return tiny_sd15_dir, experts, photos, root


@pytest.fixture(scope="module")
def trained(setup):
    model, experts, photos, root = setup
    reset_accelerate()
    try:
        result = train_gates(_config(model, experts, photos, root / "run", checkpointing_steps=3))
    finally:
        reset_accelerate()
    return result


def test_gate_training_trains_the_gates_only_and_writes_a_self_contained_file(setup, trained):
    model, experts, _, _ = setup
    assert len(trained.losses) == 3 and all(math.isfinite(v) for v in trained.losses)
    mole_file = read_mole(trained.files["mole"])
    # The gates moved away from their uniform start (W = 0, b = 0, log T = 0).
    weights = [v for k, v in mole_file.gates.items() if k.endswith(".weight")]
    assert weights and max(float(w.abs().max()) for w in weights) > 1e-4
    # The experts in the file are exactly the source files' folded weights: nothing but the gates trained.
    pipe = DiffusionPipeline.from_pretrained(model)
    sources = load_experts(pipe, [experts[n] for n in EXPERTS])
    assert [e.name for e in mole_file.experts] == list(EXPERTS)
    for stored, source in zip(mole_file.experts, sources, strict=True):
        assert stored.sha256 == source.sha256 and stored.layers.keys() == source.layers.keys()
        for key, lora in source.layers.items():
            assert torch.equal(stored.layers[key].down, lora.down) and torch.equal(stored.layers[key].up, lora.up)
    # The checkpoint holds the gates (and optimizer state), never the experts or the base model.
    checkpoint = trained.output_dir / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors") if ".state." not in p.name) == ["gates.safetensors"]
    assert load_tensors(checkpoint / "gates.safetensors")[0].keys() == mole_file.gates.keys()
    assert Image.open(trained.files["gates"]).size[0] > 100
    card = (trained.output_dir / "README.md").read_text()
    assert "a photo of sks dog" in card and "python -m moslora_diffusion.mole generate" in card


def test_the_balance_term_has_gradient_on_the_gates_and_reads_zero_when_balanced(tiny_sd15_dir, setup):
    """GateTrainable.extra_loss = w * (-sum log q_i - N log N): 0 at uniform gates, > 0 and with gradient on
    every gate otherwise; it forgets the forward's gates afterwards (the next step's loss never sees them)."""
    _, experts, _, _ = setup
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    mole = attach_mole(pipe, load_experts(pipe, [experts[n] for n in EXPERTS]))
    trainable = GateTrainable(mole, balance_weight=0.5)

    def step() -> None:
        pipe.unet(latents(), 500, **encode(pipe, ["a photo of sks dog"]))

    step()
    assert abs(float(trainable.extra_loss().detach())) < 1e-6  # uniform start: q = (1/2, 1/2)
    assert mole.current_gates() == {}
    with torch.no_grad():
        for gate in mole.gates:
            gate.bias.copy_(torch.tensor([1.5, -1.5]))
    step()
    loss = trainable.extra_loss()
    loss.backward()
    q = torch.softmax(torch.tensor([1.5, -1.5]), 0)
    assert float(loss) == pytest.approx(0.5 * (float(-torch.log(q).sum()) - 2 * math.log(2)), rel=1e-4)
    assert all(float(g.bias.grad.abs().max()) > 0 for g in mole.gates)


SETTINGS = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, lr_scheduler="linear")


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """The gates of a 6-step run without any interruption."""
    model, experts, photos, root = setup
    reset_accelerate()
    try:
        train_gates(_config(model, experts, photos, root / "a", **SETTINGS))
    finally:
        reset_accelerate()
    gates = read_mole(root / "a" / "mole.safetensors").gates
    assert any(float(gates[k].abs().max()) > 0 for k in gates if k.endswith(".weight"))  # learned: not trivial
    return gates


def _start_command(setup, out: Path, **slow) -> subprocess.Popen:
    model, experts, photos, _ = setup
    command = [sys.executable, "-m", "moslora_diffusion.mole", *_argv(_config(model, experts, photos, out,
                                                                               **SETTINGS, **slow))]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_after_first_checkpoint(setup, out: Path, **extra) -> None:
    """SIGKILL the gate-training command once checkpoint-3 is on disk; what it wrote later is removed."""
    # Validation right after the checkpoint gives the kill a wide window (validation changes no training state).
    proc = _start_command(setup, out, validation_prompt="a photo of sks dog", validation_steps=4,
                          num_validation_images=4, validation_inference_steps=25, **extra)
    wait_for(out / "checkpoint-3", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "mole.safetensors").exists()
    for later in out.glob("checkpoint-6*"):
        shutil.rmtree(later)


def _resume_and_compare(setup, out: Path, uninterrupted: dict, resumed_from: int, **extra) -> None:
    model, experts, photos, _ = setup
    reset_accelerate()
    try:
        resumed = train_gates(_config(model, experts, photos, out, resume_from_checkpoint="latest", **SETTINGS,
                                      **extra))
    finally:
        reset_accelerate()
    assert resumed.resumed_from == resumed_from and resumed.steps == 6
    gates = read_mole(out / "mole.safetensors").gates
    assert gates.keys() == uninterrupted.keys() and all(torch.equal(gates[k], uninterrupted[k]) for k in gates)


def test_gate_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_gates(setup, uninterrupted, capsys):
    root = setup[3]
    _kill_after_first_checkpoint(setup, root / "b")
    capsys.readouterr()
    _resume_and_compare(setup, root / "b", uninterrupted, 3)
    printed = capsys.readouterr().out
    assert f"Resumed from checkpoint-3 in {root / 'b'}: step 3 of 6." in printed  # said at the start
    assert "Gates trained: step 6 (resumed from step 3); mole.safetensors" in printed  # and in the last line


def test_spatial_gate_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_gates(setup):
    """Per-position gates (--spatial_gates) resume bit for bit after a SIGKILL as block gates do."""
    model, experts, photos, root = setup
    root = root / "spatial"
    reset_accelerate()
    try:
        train_gates(_config(model, experts, photos, root / "a", **SETTINGS, spatial_gates=True))
    finally:
        reset_accelerate()
    uninterrupted = read_mole(root / "a" / "mole.safetensors").gates
    assert any(float(uninterrupted[k].abs().max()) > 0 for k in uninterrupted if k.endswith(".weight"))
    _kill_after_first_checkpoint(setup, root / "b", spatial_gates=True)
    _resume_and_compare(setup, root / "b", uninterrupted, 3, spatial_gates=True)
    assert read_mole(root / "b" / "mole.safetensors").info["settings"]["granularity"] == "position"


def test_gate_training_stopped_by_sigterm_saves_its_last_step_and_resumes_to_the_same_gates(setup, uninterrupted):
    """A real SIGTERM (a job manager's stop, the app's Cancel) once the first progress line is written: exit
    status 143, one line naming the step and how to resume, checkpoint-<step> saved (checkpoints are every 3
    steps otherwise); resuming gives the uninterrupted gates bit for bit. Slow validation images after every
    step keep the run inside its loop when the signal lands."""
    out = setup[3] / "term"
    proc = _start_command(setup, out, validation_prompt="a photo of sks dog", validation_steps=1,
                          num_validation_images=4, validation_inference_steps=25)
    progress = out / "progress.jsonl"
    deadline = time.monotonic() + 180
    while not (progress.exists() and progress.read_text().endswith("\n")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no progress line"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Stopped by SIGTERM at step ") and "Traceback" not in output, output
    saved = find_resume_checkpoint("latest", out)
    assert f"at step {saved.step} of 6" in last and f"checkpoint-{saved.step} in {out} holds this state" in last
    assert "--resume_from_checkpoint latest (same --output_dir)" in last and not (out / "mole.safetensors").exists()
    _resume_and_compare(setup, out, uninterrupted, saved.step)


def _one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what earlier steps printed
    with pytest.raises(SystemExit) as exit_info:
        mole_main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_gate_training_inputs_are_one_line_before_the_model_loads(setup, tiny_sdxl_dir, tmp_path, capsys,
                                                                    monkeypatch):
    import moslora_diffusion.mole.gate_training as gate_training

    model, experts, photos, root = setup

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gate_training, "load_base", never)
    out = tmp_path / "out"
    base = _argv(_config(model, experts, photos, out))
    pickle = tmp_path / "expert.bin"
    pickle.write_bytes(b"not loaded")
    unrecorded = tmp_path / "plain" / "moslora.safetensors"  # no training_config.json beside it
    unrecorded.parent.mkdir()
    shutil.copy(experts["dog"] / "moslora.safetensors", unrecorded)
    xl = make_adapter(tiny_sdxl_dir, tmp_path / "xl" / "moslora.safetensors", **EXPERT_SPECS["dog"])
    dog = str(experts["dog"])

    def replaced(flag: str, *values: str) -> list[str]:
        i = base.index(flag)
        end = next((j for j in range(i + 1, len(base)) if base[j].startswith("--")), len(base))
        return base[:i] + [flag, *values] + base[end:]

    cases = {
        "--experts takes 2 to 8 adapters, got 1": replaced("--experts", dog),
        "only .safetensors files are accepted": replaced("--experts", dog, str(pickle)),
        "expert file not found": replaced("--experts", dog, str(tmp_path / "missing.safetensors")),
        "experts of different families": replaced("--experts", dog, str(xl)),
        "--expert_prompts: 1 given for 2 --experts": replaced("--expert_prompts", "a photo of sks dog"),
        "its photo folder is not recorded; pass --expert_data_dirs": [
            a for a in replaced("--experts", dog, str(unrecorded)) if a not in ("--expert_data_dirs",
                                                                               *map(str, photos.values()))],
        "--balance_weight must be >= 0": base + ["--balance_weight", "-1"],
        "--learning_rate must be a finite number": base + ["--learning_rate", "inf"],
        "--max_train_steps must be": base + ["--max_train_steps", "99999999999999999999"],
        "--output_dir is empty": replaced("--output_dir", ""),
        "holds DreamBooth adapters (train_dreambooth.py), not MoLE gates": base + [
            "--resume_from_checkpoint", str(_dreambooth_checkpoint(tmp_path))],
        # class images were generated among an expert's photos (and read back as its subject)
        f"--class_data_dir is expert {dog}'s photo folder": base + [
            "--with_prior_preservation", "--class_prompt", "a photo of a dog", "--class_data_dir", str(photos["dog"])],
        f"lies inside expert {dog}'s photo folder": base + [
            "--with_prior_preservation", "--class_prompt", "a photo of a dog", "--class_data_dir",
            str(photos["dog"] / "class")],
    }
    for expected, argv in cases.items():
        assert expected in _one_line_error(argv, capsys)
        assert not out.exists()
    # A gate run in an expert's own training folder: --overwrite_output_dir would delete what that folder's run
    # wrote (its manifest lists the adapter), so the run is refused and the expert's files stay.
    from moslora_diffusion.training.run_folder.manifest import write_manifest

    run = tmp_path / "dog-run"
    shutil.copytree(experts["dog"], run)
    write_manifest(run, {"moslora.safetensors"})
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = replaced("--experts", str(run), str(experts["cat"]))
    argv = [a if a != str(out) else str(run) for a in argv] + ["--overwrite_output_dir"]
    assert "would overwrite the input" in _one_line_error(argv, capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def _dreambooth_checkpoint(root: Path) -> Path:
    from moslora_diffusion.training.run_folder.checkpoints import save_checkpoint

    state = {"family": "sd1", "adapter": {"rank": 4}, "targets": {"unet": ["x"]}}
    return save_checkpoint(root / "dreambooth-run", 2, state, {"adapter": {"unet.x.A": torch.ones(2)}},
                           {"optimizer": {"state": {}}})


def test_resuming_gates_of_other_experts_is_refused(setup, trained, tmp_path, capsys):
    """A checkpoint of dog+cat taken by a run of cat+dog (another order: other gates) into a new folder."""
    model, experts, photos, _ = setup
    config = _config(model, {"dog": experts["cat"], "cat": experts["dog"]}, photos, tmp_path / "swapped",
                     resume_from_checkpoint=str(trained.output_dir / "checkpoint-3"))
    err = _one_line_error(_argv(config), capsys)
    assert "holds gates for other experts (by file hash) than this run" in err


def test_generate_and_export_commands_use_the_trained_gates(setup, trained, tmp_path, capsys):
    model, _, _, _ = setup
    mole_path = trained.files["mole"]
    out = tmp_path / "samples"
    common = ["--base", str(model), "--mole", str(mole_path)]
    status = mole_main(["generate", *common, "--prompt", "a photo of sks dog", "--seeds", "3", "--steps", "2",
                        "--size", "64", "--mask", "cat", "--scale", "dog=1.5", "--heatmap", "--out", str(out)])
    assert status == 0
    (png,) = sorted(out.rglob("*-mole.png"))
    text = Image.open(png).text["parameters"]
    assert "Seed: 3" in text and "MoLE: mole.safetensors" in text and "MoLE mask: cat" in text
    assert 'MoLE scales: "dog: 1.5, cat: 1"' in text
    # the heat map beside its image, named after it (it was OUT/gates-000.png, replaced by the next run's)
    assert png.with_name(png.stem + "-gates.png").is_file()
    mole_main(["generate", *common, "--prompt", "a photo of sks dog", "--seeds", "3", "--steps", "2", "--size", "64",
               "--heatmap", "--out", str(out)])
    assert len(sorted(out.rglob("*-mole-gates.png"))) == 2 and png.with_name(png.stem + "-gates.png").is_file()
    lora = tmp_path / "static.safetensors"
    assert mole_main(["export", *common, "--to", "lora-kohya", "--out", str(lora), "--dtype", "fp32"]) == 0
    folded, kind = read_lora_file(lora, DiffusionPipeline.from_pretrained(model), "static")
    ranks = {lora_.rank for lora_ in folded.layers.values()}
    assert kind == "kohya" and max(ranks) == EXPERT_SPECS["dog"]["rank"] + EXPERT_SPECS["cat"]["rank"]
    before = lora.read_bytes()
    assert "already exists; pass --overwrite" in _one_line_error(
        ["export", *common, "--to", "lora-kohya", "--out", str(lora)], capsys)
    assert lora.read_bytes() == before
    assert "no expert bird" in _one_line_error(["generate", *common, "--prompt", "x", "--mask", "bird", "--out",
                                                str(tmp_path / "none")], capsys)
    assert not (tmp_path / "none").exists()


def test_mole_outputs_never_overwrite_the_mole_file_they_read(setup, trained, tmp_path, capsys):
    """export --out naming the MoLE's own folder (merged-diffusers replaces it whole) or its mole.safetensors,
    even with --overwrite, and generate --out naming a file: refused before the model loads, nothing changed."""
    model, _, _, _ = setup
    folder = tmp_path / "gates"
    shutil.copytree(trained.output_dir, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    common = ["--base", str(model), "--mole", str(folder)]
    for target, out in (("merged-diffusers", folder), ("lora-kohya", folder / "mole.safetensors")):
        err = _one_line_error(["export", *common, "--to", target, "--out", str(out), "--overwrite"], capsys)
        assert "would overwrite the input" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = _one_line_error(["generate", *common, "--prompt", "x", "--out", str(notes)], capsys)
    assert "is a file" in err and notes.read_text() == "mine"
    assert "--seeds" in _one_line_error(["export", *common, "--to", "lora-kohya", "--out",
                                         str(tmp_path / "s.safetensors"), "--seeds", "-5"], capsys)
