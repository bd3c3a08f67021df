"""`python -m moslora_diffusion.evaluate` end to end on the toy base: generate, score, report, resume; DreamBench
folders; bad input refused in one line before anything is loaded or written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_adapter

from moslora_diffusion import evaluate
from moslora_diffusion.evaluation.plan import Job, parse_dreambench
from moslora_diffusion.evaluation.stats import mean_ci

TOY_BASE = Path(__file__).resolve().parents[1] / "assets" / "toy-base"
TOY_PHOTOS = TOY_BASE.parent / "toy-subject"
PROMPTS = ["a photo of sks star", "a photo of sks star on the left, on a gray background"]
FAST = ["--steps", "2", "--sampler", "DDIM", "--guidance", "5", "--seeds", "0", "1"]

DREAMBENCH_TXT = """Classes

subject_name,class
star_a,star
dog_b,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


@pytest.fixture(scope="module")
def toy_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-adapters")
    return {name: make_adapter(TOY_BASE, root / f"{name}.safetensors", seed=seed, std=0.05)
            for name, seed in (("one", 1), ("two", 2))}


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        status = evaluate.main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def test_toy_run_scores_reports_and_resumes(tmp_path, toy_adapters, capsys):
    out = tmp_path / "eval"
    argv = ["--base", TOY_BASE, "--adapter", f"one={toy_adapters['one']}", "--adapter", f"two={toy_adapters['two']}",
            "--photos", TOY_PHOTOS, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *FAST, "--metrics", "toy",
            "--out", out]
    status, printed, err = _run(capsys, *argv)
    assert status == 0, err
    assert "generated 8 images, scored 8" in printed
    pngs = sorted(out.glob("images/**/*.png"))
    assert len(pngs) == 8  # 2 adapters x 2 prompts x 2 seeds
    assert Job("one", "toy-subject", PROMPTS[1], 1).path(out / "images") in pngs  # names fixed by the job
    report = json.loads((out / "report.json").read_text())
    rows = report["images"]
    assert {(r["adapter"], r["prompt"], r["seed"]) for r in rows} == {
        (a, p, s) for a in ("one", "two") for p in PROMPTS for s in (0, 1)}
    assert all(0.0 <= r["toy_subject"] <= 1.0 and 0.0 <= r["toy_prompt"] <= 1.0 for r in rows)
    # the overall mean and interval are taken over (subject, prompt) cells, each the mean over its seeds
    cells = [sum(r["toy_prompt"] for r in rows if r["adapter"] == "one" and r["prompt"] == p) / 2 for p in PROMPTS]
    overall = report["adapters"]["one"]["overall"]["toy_prompt"]
    assert overall == pytest.approx(mean_ci(cells, bounds=(-1.0, 1.0)))
    paired = report["paired"]["one - two"]["toy_prompt"]
    assert paired["n"] == 2 and paired["diff"] == pytest.approx(
        overall["mean"] - report["adapters"]["two"]["overall"]["toy_prompt"]["mean"])
    assert "| one |" in (out / "report.md").read_text() and (out / "contact_sheet.png").stat().st_size > 0

    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    status, printed, err = _run(capsys, *argv)  # resumed: nothing is generated again, the scores are the same
    assert status == 0, err
    assert "generated 0 images, scored 8" in printed
    assert {p: p.stat().st_mtime_ns for p in pngs} == stamps
    assert json.loads((out / "report.json").read_text())["images"] == rows

    pngs[0].unlink()  # one image lost: only that one is made again, identical to the first time (same seed)
    status, printed, _ = _run(capsys, *argv)
    assert status == 0 and "generated 1 images" in printed
    assert json.loads((out / "report.json").read_text())["images"] == rows


def test_dreambench_folder_with_tiny_dino_and_clip(tmp_path, toy_adapters, tiny_scorer_dirs, capsys):
    bench = tmp_path / "bench"
    for subject in ("star_a", "dog_b"):
        shutil.copytree(TOY_PHOTOS, bench / subject)
    (bench / "prompts_and_classes.txt").write_text(DREAMBENCH_TXT)
    method = tmp_path / "runs"
    method.mkdir()
    for subject in ("star_a", "dog_b"):
        shutil.copy(toy_adapters["one"], method / f"{subject}.safetensors")
    out = tmp_path / "eval"
    status, printed, err = _run(capsys, "--base", TOY_BASE, "--dreambench", bench, "--adapter", f"m={method}",
                                "--include_base", *FAST[:-3], "--seeds", "0", "--dino_model",
                                tiny_scorer_dirs["dino"], "--clip_model", tiny_scorer_dirs["clip"], "--out", out)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    prompts = {(r["subject"], r["prompt"]) for r in report["images"]}
    assert prompts == {("star_a", "a sks star in the snow"), ("star_a", "a red sks star"),  # an object
                       ("dog_b", "a sks dog in the jungle"), ("dog_b", "a sks dog wearing a red hat")}  # live
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t"}
    assert set(report["adapters"]["m"]["prompts"]) >= {"a {token} {class} in the snow"}  # grouped across subjects
    assert report["paired"]["base - m"]["dino"]["n"] == 4


def test_parse_dreambench_reads_the_published_layout():
    classes, objects, live = parse_dreambench(DREAMBENCH_TXT)
    assert classes == {"star_a": "star", "dog_b": "dog"}
    assert objects == ["a {0} {1} in the snow", "a red {0} {1}"]
    assert live[1].format("sks", "dog") == "a sks dog wearing a red hat"


BAD_INPUTS = [
    (["--adapter", "missing.safetensors", "--photos", "{photos}", "--prompt", "x"], "adapter file not found"),
    (["--include_base", "--prompt", "x"], "either --photos"),
    (["--include_base", "--photos", "{photos}"], "give the prompts"),
    (["--photos", "{photos}", "--prompt", "x"], "nothing to evaluate"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--steps", "0"], "steps must be between 1"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--guidance", "nan"], "guidance"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--seeds", "-3"], "--seeds: -3"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--batch_size", "0"], "--batch_size must be"),
    (["--include_base", "--photos", "{empty}", "--prompt", "x"], "no photos"),
    (["--include_base", "--dreambench", "{empty}"], "no prompts_and_classes.txt"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--dino_model", "{pickles}"], "only pickle weights"),
    (["--include_base", "--photos", "{photos}", "--prompts_file", "{empty}/none.txt"], "cannot read it"),
    (["--include_base", "--photos", "{photos}", "--prompt", "x", "--metrics", "fid"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    import moslora_diffusion.evaluation.cli as cli

    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles" / "config.json").write_text("{}")
    (tmp_path / "pickles" / "pytorch_model.bin").write_bytes(b"x")
    names = {"photos": TOY_PHOTOS, "empty": tmp_path / "empty", "pickles": tmp_path / "pickles"}
    argv = [a.format(**names) for a in argv]
    status, _, err = _run(capsys, "--base", TOY_BASE, *argv, "--out", tmp_path / "out")
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable hub"])
def test_scorer_models_not_at_hand_fail_at_once_before_any_image(tmp_path, capsys, monkeypatch, offline):
    """Offline, a DreamBench scorer model that is not in the hub cache is one line within seconds, before the model
    loads and before any image is generated (it used to come after every image, after ~115 s of retries)."""
    import time

    from huggingface_hub import constants

    import moslora_diffusion.evaluation.cli as cli

    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    started = time.monotonic()
    status, _, err = _run(capsys, "--base", TOY_BASE, "--include_base", "--photos", TOY_PHOTOS, "--prompt", "x",
                          "--dino_model", "moslora-tests/no-such-dino", "--out", tmp_path / "out")
    assert time.monotonic() - started < 20
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the ViTModel scorer 'moslora-tests/no-such-dino' is not in the hub cache and could "
                          "not be downloaded (") and "give a local model folder (--dino_model" in err
    assert ("HF_HUB_OFFLINE is set" in err) == (offline == "HF_HUB_OFFLINE")
    assert not (tmp_path / "out").exists()


def test_the_reference_photos_are_named_in_the_report_and_skipped_ones_said(tmp_path, capsys):
    """An unreadable reference is named with why it is skipped, a 1x1 one is used with a note (as the trainer notes
    tiny photos), the report lists the references used; a folder with none usable is refused, naming the files."""
    from PIL import Image

    photos = tmp_path / "photos"
    shutil.copytree(TOY_PHOTOS, photos)
    (photos / "broken.png").write_text("not a picture")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(photos / "tiny.png")
    used = sorted(p.name for p in TOY_PHOTOS.iterdir() if p.suffix == ".png" and "_mask" not in p.stem)
    out = tmp_path / "eval"
    status, _, err = _run(capsys, "--base", TOY_BASE, "--include_base", "--photos", photos, "--prompt", PROMPTS[0],
                          "--steps", "1", "--sampler", "DDIM", "--seeds", "0", "--metrics", "toy", "--out", out)
    assert status == 0, err
    assert "note: subject 'photos': reference broken.png: not an image Pillow can read; skipped" in err
    assert "note: subject 'photos': reference tiny.png is 1x1, very small: the scorers upscale it" in err
    references = json.loads((out / "report.json").read_text())["settings"]["references"]
    assert references == {"photos": sorted(used + ["tiny.png"])}
    assert f"References of photos: {', '.join(sorted(used + ['tiny.png']))}" in (out / "report.md").read_text()
    for path in photos.iterdir():
        if path.name != "broken.png":
            path.unlink()
    status, _, err = _run(capsys, "--base", TOY_BASE, "--include_base", "--photos", photos, "--prompt", PROMPTS[0],
                          "--metrics", "toy", "--out", tmp_path / "eval2")
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "no photos of subject 'photos' to compare with (broken.png: not an image Pillow can read)" in err


def test_a_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--base", TOY_BASE, "--include_base", "--photos", TOY_PHOTOS, "--prompt", PROMPTS[0], "--steps", "1",
            "--sampler", "DDIM", "--seeds", "0", "--metrics", "toy"]
    assert _run(capsys, *argv, "--out", out)[0] == 0
    status, _, err = _run(capsys, *[a if a != "1" else "2" for a in argv], "--out", out)
    assert status == 2 and "other settings (steps 1 -> 2)" in err


def test_a_hub_scorer_is_loaded_from_its_snapshot_or_by_id_when_its_weights_are_in_a_conversion_branch(
        tmp_path, monkeypatch):
    import huggingface_hub

    from moslora_diffusion.evaluation.hf_scorers import HUB_FILES, checked_source

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    asked = []

    def fake_snapshot(repo_id, allow_patterns, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert checked_source("org/dino", "ViTModel") == "org/dino"  # no safetensors on main: transformers finds them
    (snapshot / "model.safetensors").write_bytes(b"")
    assert checked_source("org/dino", "ViTModel") == str(snapshot)
    assert asked[0] == ("org/dino", HUB_FILES) and not any("*.bin" in p or "*.pt" in p for p in HUB_FILES)
